"""Print a built notebook's text outputs and save its plots as PNG files, to review them without Jupyter.

    python tools/notebook_sources/extract.py notebooks/03_pruning.ipynb /tmp/nb03
"""
import base64
import sys
from pathlib import Path

import nbformat


def main(path: str, out: str) -> None:
    nb = nbformat.read(path, as_version=4)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for ci, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        for k, o in enumerate(cell.outputs):
            if o.output_type == "stream":
                print(f"--- code cell {ci} {o.name}\n{o.text[:3000]}")
            elif o.output_type == "error":
                print(f"--- code cell {ci} ERROR {o.ename}: {o.evalue}")
            elif "image/png" in o.get("data", {}):
                png = folder / f"cell{ci:02d}_{k}.png"
                png.write_bytes(base64.b64decode(o.data["image/png"]))
                print(f"--- code cell {ci} plot {png} ({len(o.data['image/png']) // 1000} kB base64)")
            elif "text/plain" in o.get("data", {}):
                print(f"--- code cell {ci}\n{o.data['text/plain'][:500]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
