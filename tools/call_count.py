"""Count the minivar files and functions that one `minivar.sample()` call on the toy model passes through.

    python tools/call_count.py            # prints files, functions, and the per-file function lists

Everything runs first once (loading, caches); the count is of a second, warm call, traced with
sys.setprofile. Only named Python functions defined inside the minivar package are counted (no lambdas or comprehensions).
"""
import sys
from collections import defaultdict
from pathlib import Path

import minivar

ROOT = Path(minivar.__file__).resolve().parent


def main() -> None:
    minivar.sample("a red circle", res=None, model="toy", progress=False, seed=0)  # warm: load and cache
    seen: dict[str, set[str]] = defaultdict(set)

    def profile(frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename).resolve()
            name = frame.f_code.co_qualname
            if path.is_relative_to(ROOT) and not name.endswith(("<listcomp>", "<genexpr>", "<lambda>", "<dictcomp>", "<setcomp>")):
                seen[str(path.relative_to(ROOT))].add(name)

    sys.setprofile(profile)
    try:
        minivar.sample("a red circle", res=None, model="toy", progress=False, seed=0)
    finally:
        sys.setprofile(None)
    print(f"files: {len(seen)}  functions: {sum(len(v) for v in seen.values())}")
    for f in sorted(seen):
        print(f"  {f} ({len(seen[f])}): {', '.join(sorted(seen[f]))}")


if __name__ == "__main__":
    main()
