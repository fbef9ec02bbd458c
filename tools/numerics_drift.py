"""Per-scale teacher-forced logit drift of the fast numerics against the reference on the 2B shape
(depth 4, random bf16 weights, 1024, prune=True): python tools/numerics_drift.py OUT.json"""
import json, sys, torch
from minivar.bench.run import shape_subject, PROMPT
torch.set_num_threads(2)
def rel(a, b):
    a, b = a.double(), b.double(); return float((a - b).norm() / b.norm())
ref = shape_subject("infinity-2b-shape", 4, False, weight_dtype=torch.bfloat16, numerics="reference").pipe
out_ref = ref.generate(PROMPT, res=1024, prune=True, trace=True, output_type="latent", seed=1)
del ref
res = {}
for mode in ("fp32", "bf16"):
    pipe = shape_subject("infinity-2b-shape", 4, False, weight_dtype=torch.bfloat16, numerics=mode).pipe
    out = pipe.generate(PROMPT, res=1024, prune=True, trace=True, output_type="latent", seed=1, force_bits=out_ref.trace.bits)
    res[mode] = [rel(a, b) for a, b in zip(out.trace.logits, out_ref.trace.logits)]
    print(mode, " ".join(f"{e:.1e}" for e in res[mode]), flush=True)
json.dump({"scales": out_ref.trace.scales, **res}, open(sys.argv[1] if len(sys.argv) > 1 else "numerics_drift.json", "w"))
