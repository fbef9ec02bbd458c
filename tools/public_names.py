"""List public names (top-level functions, classes and constants) that more than one minivar module defines.

    python tools/public_names.py        # prints each colliding name with its modules; exit 1 if any

Allowed: `main`, the entry point every `python -m` module names so (`python -m minivar.bench`, ...).
"""
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "minivar"
ALLOWED = {"main"}  # see the docstring


def defined(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("_")}


def main() -> int:
    where = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        for name in defined(path):
            where[name].append(str(path.relative_to(ROOT.parent)))
    clashes = {n: m for n, m in sorted(where.items()) if len(m) > 1 and n not in ALLOWED}
    for name, modules in clashes.items():
        print(f"{name}: {', '.join(modules)}")
    print(f"{len(clashes)} colliding public names")
    return 1 if clashes else 0


if __name__ == "__main__":
    sys.exit(main())
