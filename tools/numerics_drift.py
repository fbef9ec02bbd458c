"""Per-scale teacher-forced logit drift of the fast numerics ("fp32", "bf16") against the reference: the
reference run's bits are forced on the fast run, so both see the same inputs at every scale.

    python tools/numerics_drift.py --subject 2b-shape [--json out.json]   # Infinity-2B widths, depth 4, 1024
    python tools/numerics_drift.py --subject tiny                         # tests/fixtures/tiny-a at 1024
"""
import argparse
import json
from pathlib import Path

import torch

import minivar
from minivar.bench.run import PROMPT, shape_subject

TINY = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-a"


def pipeline(subject: str, numerics: str) -> minivar.Pipeline:
    if subject == "tiny":
        return minivar.load(transformer=TINY / "infinity.pth", vae=TINY / "vae.pth", text_encoder=TINY / "t5",
                            config=TINY / "infinity_config.json", vae_config=TINY / "vae_config.json", numerics=numerics)
    return shape_subject("infinity-2b-shape", 4, False, weight_dtype=torch.bfloat16, numerics=numerics).pipe


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subject", choices=("tiny", "2b-shape"), default="2b-shape")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    run = dict(res=1024, prune=True, trace=True, output_type="latent", seed=1)
    ref = pipeline(args.subject, "reference").generate(PROMPT, **run)
    out = {"scales": ref.trace.scales}
    for mode in ("fp32", "bf16"):
        fast = pipeline(args.subject, mode).generate(PROMPT, force_bits=ref.trace.bits, **run)
        out[mode] = [rel(a, b) for a, b in zip(fast.trace.logits, ref.trace.logits)]
        print(f"{mode}: max {max(out[mode]):.1e}; per scale " + " ".join(f"{e:.1e}" for e in out[mode]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out))
