"""The prose points at code that exists: names in docstrings and the README resolve, and the three
reading orders (README, minivar/__init__.py, minivar/model/__init__.py) agree."""
import importlib
import pkgutil
import re
from pathlib import Path

import minivar
import minivar.model

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [ROOT / "README.md", *sorted((ROOT / "minivar").rglob("*.py"))]
MODULES: dict[str, list] = {"minivar": [minivar]}
for info in pkgutil.walk_packages(minivar.__path__, "minivar."):
    if not info.name.endswith("__main__"):  # running it is the CLI
        module = importlib.import_module(info.name)
        for key in (info.name, info.name.removeprefix("minivar."), info.name.rsplit(".", 1)[-1]):
            MODULES.setdefault(key, []).append(module)
CLASSES = {name: obj for mods in MODULES.values() for m in mods for name, obj in vars(m).items() if isinstance(obj, type)}
FUNCTIONS = {name for mods in MODULES.values() for m in mods for name, obj in vars(m).items()
             if callable(obj) and getattr(obj, "__module__", "").startswith("minivar")}
# prefixes that are not minivar modules: libraries, and fields of minivar's dataclasses (`gpt_stage.batch`)
OTHERS = {"torch", "np", "F", "nn", "os", *(f for c in CLASSES.values() for f in getattr(c, "__dataclass_fields__", {}))}


def has(obj, name: str) -> bool:
    return hasattr(obj, name) or name in getattr(obj, "__dataclass_fields__", {})


def resolves(ref: str) -> bool | None:
    """`module.name`, `package.module.name` or `Class.attr`: True or False; None when `ref` does not start
    with a minivar module or class (an instance, a checkpoint key, a library) and does not end in a minivar
    function either (`memory.release_mapped`: the module is gone, the function lives on elsewhere)."""
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        starts = MODULES.get(".".join(parts[:i]), []) or ([CLASSES[parts[0]]] if i == 1 and parts[0] in CLASSES else [])
        for obj in starts:
            rest = parts[i:]
            while rest and has(obj, rest[0]):
                obj = getattr(obj, rest[0], None) if hasattr(obj, rest[0]) else None
                rest = rest[1:]
            if not rest:
                return True
        if starts:
            return False
    return False if len(parts) == 2 and parts[1] in FUNCTIONS and parts[0] not in OTHERS else None


FILE_TYPES = {"py", "pth", "pt", "json", "jsonl", "safetensors", "model", "md", "txt", "png", "sh", "toml", "ipynb"}


def test_dotted_names_in_docstrings_and_the_readme_exist():
    """`memory.release_mapped`, `presets.stages` and `bench.extrapolate` outlived their modules."""
    stale = []
    for path in TEXTS:
        for ref in re.findall(r"`(?:minivar\.)?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)", path.read_text(encoding="utf-8")):
            if ref.rsplit(".", 1)[1] not in FILE_TYPES and resolves(ref) is False:
                stale.append(f"{path.relative_to(ROOT)}: {ref}")
    assert stale == []


def test_file_names_in_docstrings_and_the_readme_exist():
    """checks.py and memory.py were folded into pipeline.py."""
    files = {p.name for p in ROOT.glob("**/*.py") if ".git" not in p.parts}
    missing = [f"{path.relative_to(ROOT)}: {name}" for path in TEXTS
               for name in re.findall(r"\b(\w+\.py)\b", path.read_text(encoding="utf-8")) if name not in files]
    assert missing == []


def reading_order(text: str) -> list[str]:
    names = [n for n in re.findall(r"\b(\w+)\.py\b", text) if n in ORDER]
    return list(dict.fromkeys(names))


ORDER = ["pipeline", "t5", "sampling", "transformer", "pruning", "vae", "config"]


def test_one_reading_order():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reading the code", 1)[1].split("\n## ", 1)[0]
    assert reading_order(section) == ORDER
    assert reading_order(minivar.__doc__) == ORDER
    assert reading_order(minivar.model.__doc__) == ORDER  # it names ../pipeline.py first
