"""The notebooks in notebooks/ run top to bottom on the toy model, and their committed outputs are current.

Each committed notebook must be small, carry its outputs (plots included) and no errors, and start
with the `model = 'toy'` cell. Its cells must be what tools/notebook_sources builds, and executing it
again headless (nbclient, python3 kernel, this checkout first on the kernel's import path) must give
the same code cells, outputs where there were outputs, the same number of plots, and no errors.
Numbers and pixels are not compared: timings and plots change from run to run.

A failure here usually means the package or the toy weights changed: rebuild with
`python tools/notebook_sources/build.py` and commit notebooks/.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from minivar.loading.hub import find_directory

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
SOURCES = REPO / "tools" / "notebook_sources"
NAMES = {"01": "01_walkthrough", "02": "02_per_scale_spectra", "03": "03_pruning", "04": "04_latency"}
MAX_BYTES = 3_000_000
CELL_TIMEOUT = 300  # seconds; a whole notebook takes well under a minute with the toy


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def errors(cell) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]


def plots(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def committed(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def skip_reason() -> str | None:
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        return "no python3 Jupyter kernel (pip install -e '.[dev]' brings ipykernel)"
    try:
        find_directory("toy")
    except ValueError as e:
        return f"no toy model: {e}"
    return None


def test_every_notebook_is_committed():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NAMES.values())


@pytest.mark.parametrize("name", NAMES.values())
def test_committed_notebook_is_small_executed_and_starts_with_the_model(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    assert path.stat().st_size <= MAX_BYTES, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB (limit 3 MB)"
    cells = code_cells(committed(name))
    assert cells[0].source.startswith("model = 'toy'"), "the first code cell picks the model"
    assert all(c.execution_count is not None for c in cells), "commit the notebook with its outputs"
    assert not [e for c in cells for e in errors(c)]
    assert sum(plots(c) for c in cells) > 0, "no plots in the outputs"


@pytest.mark.parametrize("key", NAMES)
def test_committed_code_is_what_the_sources_build(key):
    spec = importlib.util.spec_from_file_location("notebook_build", SOURCES / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    built = [(c.cell_type, c.source) for c in build.build(key).cells]
    assert [(c.cell_type, c.source) for c in committed(NAMES[key]).cells] == built, \
        "tools/notebook_sources changed: rebuild with python tools/notebook_sources/build.py"


@pytest.mark.parametrize("name", NAMES.values())
def test_notebook_reexecutes_like_its_committed_version(name, tmp_path, monkeypatch):
    if reason := skip_reason():
        pytest.skip(reason)
    shutil.copy(NOTEBOOK_DIR / f"{name}.ipynb", tmp_path)
    nb = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the notebooks turn on the inline backend themselves
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    old, new = code_cells(committed(name)), code_cells(nb)
    assert len(new) == len(old)
    for i, (a, b) in enumerate(zip(old, new)):
        assert not errors(b), f"code cell {i}: {errors(b)}"
        assert bool(b.outputs) == bool(a.outputs), f"code cell {i} has {'no ' if a.outputs else ''}outputs now"
        assert plots(b) == plots(a), f"code cell {i} made {plots(b)} plots, {plots(a)} when committed"
