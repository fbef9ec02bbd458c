"""Cells and helpers the notebooks share (see build.py)."""
import nbformat

FASTVAR = "[FastVAR (arXiv 2503.23367)](https://arxiv.org/abs/2503.23367)"
INFINITY = "[Infinity (arXiv 2412.04431)](https://arxiv.org/abs/2412.04431)"

MODEL_MD = """Choose the model in the next cell. `'toy'` is the small model shipped in `minivar/toy/weights`: it works
offline, and the whole notebook runs in well under a minute on two CPU cores. `'infinity-2b'` uses the
real Infinity-2B weights at 1024x1024 (downloaded on first use: several GB, see the README's section on
weights); a GPU is advisable. The code below works the same for both."""

MODEL_CELL = "model = 'toy'  # 'infinity-2b' works too once its weights are downloaded"

SETUP = '''%matplotlib inline
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import minivar
from minivar.bench import analysis

plt.rcParams.update({"figure.dpi": 72, "image.interpolation": "nearest", "font.size": 9})
device = "cuda" if torch.cuda.is_available() else "cpu"
if model == "toy":
    torch.set_num_threads(1)  # the toy's matrices are too small to gain from more threads
res = None   # None: the resolution the model was trained at (toy: 64 px, 16x16 tokens; Infinity: 1024 px, 64x64)
SEED = 1

t0 = time.perf_counter()
pipe = minivar.load(model, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
cfg = pipe.transformer.cfg
print(f"{pipe.name}: {cfg.depth} layers, width {cfg.embed_dim}, {cfg.d_vae} bits per token, "
      f"{pipe.token_px}x{pipe.token_px} pixels per token; loaded in {time.perf_counter() - t0:.1f} s")'''


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, src) in enumerate(cells):
        src = src.strip("\n")
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        cell.id = f"cell-{i:02d}"  # stable ids keep rebuilds from rewriting every cell
        nb.cells.append(cell)
    return nb
