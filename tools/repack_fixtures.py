"""Copy the upstream golden fixtures we test against into tests/fixtures/, losslessly repacked.

The source is ../shared/golden/tiny-a (made by running upstream Infinity and FastVAR on CPU; see its
MANIFEST.md). Repacking only changes containers, never values:
  * bits are stored as uint8 instead of int64 (values are 0/1);
  * generated images are stored as RGB PNG (lossless) instead of BGR uint8 tensors;
  * per-scale logits are taken from the teacher-forced files only (they equal the seeded runs' logits,
    MANIFEST section 3.4), and generator states are dropped;
  * vae_flat.pth is not copied: it holds the same tensors as vae.pth under stripped names, so we keep its
    key list and the tests rebuild it.

    python tools/repack_fixtures.py [--src ../shared/golden/tiny-a]
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DST = ROOT / "tests" / "fixtures" / "tiny-a"
COPY = ["infinity.pth", "infinity_config.json", "vae.pth", "vae_config.json", "run_256.pt",
        "run_1024_teacher.pt", "run_1024_fastvar_teacher.pt", "vae_roundtrip.pt", "text_fixtures.pt",
        "text_report.json", "fastvar_runs.json", "MANIFEST.md"]
T5_FILES = ["config.json", "spiece.model", "special_tokens_map.json", "tokenizer_config.json"]


def repack_run(src: Path, name: str) -> None:
    run = torch.load(src / f"{name}.pt", weights_only=True)
    out = {}
    for k, v in run.items():
        if k.startswith(("logits_", "rng_state_")):
            continue
        if k.startswith("bits_"):
            v = v.to(torch.uint8)
        if k == "img_bgr":
            rgb = v[0].flip(-1).numpy()
            Image.fromarray(np.ascontiguousarray(rgb)).save(DST / f"{name}_rgb.png")
            continue
        out[k] = v
    torch.save(out, DST / f"{name}.pt")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(ROOT.parent / "shared" / "golden" / "tiny-a"))
    src = Path(ap.parse_args().src)
    DST.mkdir(parents=True, exist_ok=True)
    for f in COPY:
        shutil.copy(src / f, DST / f)
    for name in ["run_1024", "run_1024_fastvar"]:
        repack_run(src, name)
    for d in ["t5", "t5-sharded"]:
        (DST / d).mkdir(exist_ok=True)
        files = T5_FILES + [p.name for p in (src / d).glob("*.safetensors*")]
        for f in files:
            shutil.copy(src / d / f, DST / d / f)
    flat = torch.load(src / "vae_flat.pth", weights_only=True)["vae"]
    (DST / "vae_flat_keys.json").write_text(json.dumps(list(flat), indent=0))
    golden = src.parent
    for f in golden.glob("*_keys.json"):
        shutil.copy(f, DST.parent / f.name)


if __name__ == "__main__":
    main()
