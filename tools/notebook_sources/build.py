"""Write the notebooks in notebooks/ from these sources and execute them, so they are committed with outputs.

    python tools/notebook_sources/build.py                  # all four, on the toy model, into notebooks/
    python tools/notebook_sources/build.py 02 03            # only some of them
    python tools/notebook_sources/build.py --model infinity-2b --out /tmp/nb    # try other weights (not for committing)

Run it from any directory after the toy weights (minivar/toy/weights) or the package change, then
commit notebooks/: tests/test_notebooks.py re-executes every notebook and fails when one no longer runs
the way it was committed. Each nbNN.py holds one notebook as a list of ("md" | "code", source) cells;
common.py holds the cells they share. A notebook executes headless with nbclient on the python3
kernel, in notebooks/, with this checkout first on the kernel's import path and one torch thread.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NAMES = {"01": "01_walkthrough", "02": "02_per_scale_spectra", "03": "03_pruning", "04": "04_latency"}
CELL_TIMEOUT = 1800  # seconds; real weights on a CPU are slow


def kernel_env() -> None:
    """What the kernel inherits: this checkout's package, one thread, no GUI backend."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MPLBACKEND"] = "Agg"  # the notebooks turn on the inline backend themselves


def build(key: str, model: str = "toy") -> nbformat.NotebookNode:
    """The notebook nbKEY.py describes, unexecuted; `model` replaces 'toy' in its first code cell."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    nb = copy.deepcopy(importlib.import_module(f"nb{key}").NB)
    if model != "toy":
        first = next(c for c in nb.cells if c.cell_type == "code")
        first.source = f"model = {model!r}"
    return nb


def execute(nb: nbformat.NotebookNode) -> None:
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", coalesce_streams=True,
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    for cell in nb.cells:  # wall-clock timestamps would change every build for nothing
        cell.metadata.pop("execution", None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", nargs="*", metavar="NN", help=f"notebooks to build: {', '.join(NAMES)} (default: all)")
    ap.add_argument("--model", default="toy", help="replaces 'toy' in the first code cell")
    ap.add_argument("--out", type=Path, default=REPO / "notebooks")
    a = ap.parse_args(argv)
    if unknown := set(a.which) - set(NAMES):
        ap.error(f"unknown notebooks {sorted(unknown)}: choose from {', '.join(NAMES)}")
    kernel_env()
    a.out.mkdir(parents=True, exist_ok=True)
    for key in a.which or list(NAMES):
        nb = build(key, a.model)
        t0 = time.perf_counter()
        execute(nb)
        path = a.out / f"{NAMES[key]}.ipynb"
        nbformat.write(nb, path)
        print(f"{path}: {time.perf_counter() - t0:.0f} s, {path.stat().st_size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
