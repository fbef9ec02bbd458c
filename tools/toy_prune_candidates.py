"""Candidate pruning schedules for the toy, scored like the preset: mini-GenEval n 1000 (cfg 3, tau 0.5,
the eval's prompts and seeds) and the transformer FLOP ratio of `toy.geneval.evaluate`.

    python tools/toy_prune_candidates.py [MODEL] [--n 1000] [--only NAME ...] [--json out.json]

The toy's schedule at its budget is 1 2 4 6 8 12 16 (scale indices 0..6), depth 6. The candidates
A-F skip no scale, as FastVAR prunes HART; "skipping" is the toy's preset before v4 (FastVAR's Infinity
recipe by token share: 6x6 caches, 8x8 -40 %, 12x12 and 16x16 skipped), and prune=True is the preset
of today (docs/toy/experiments.md, "Pruning the toy"). K to O take stagevar apart: J with the projection
selector alone, the guidance stop alone, or the stop moved later (same file, "StageVAR's two parts apart").
P to S measure how J's cost grows with its drop ratio and cache scale (same file, "Where the 16x16
pruning loses its score"); tools/toy_restore_variants.py swaps J's selector and restoration.
"""
import argparse
import json
from dataclasses import replace

import minivar
from minivar import PruneSchedule
from minivar.model.config import scale_schedule
from minivar.model.pruning import proportional
from minivar.toy.geneval import evaluate

J = PruneSchedule(drop={6: 0.9}, layers=(0, 5), cache_scale=5)  # prune=True on the toy since session 13

CANDIDATES = {
    "unpruned": False,
    "preset (prune=True)": True,
    "stagevar": "stagevar",
    "skipping (the preset before v4)": proportional(scale_schedule("0.06M"), 6, 256),
    "G cache 8x8, 12x12 -60 %, 16x16 -75 %, layers 0-5": PruneSchedule(drop={5: 0.6, 6: 0.75}, layers=(0, 5), cache_scale=4),
    "H cache 8x8, 12x12 -50 %, 16x16 -80 %, layers 0-5": PruneSchedule(drop={5: 0.5, 6: 0.8}, layers=(0, 5), cache_scale=4),
    "I cache 8x8, 12x12 -25 %, 16x16 -85 %, layers 0-5": PruneSchedule(drop={5: 0.25, 6: 0.85}, layers=(0, 5), cache_scale=4),
    "J cache 12x12, 16x16 -90 %, layers 0-5": J,
    "A cache 8x8, 12x12 -50 %, 16x16 -75 %, layers 1-5": PruneSchedule(drop={5: 0.5, 6: 0.75}, layers=(1, 5), cache_scale=4),
    "B cache 8x8, 12x12 -50 %, 16x16 -50 %, layers 1-5": PruneSchedule(drop={5: 0.5, 6: 0.5}, layers=(1, 5), cache_scale=4),
    "C cache 8x8, 12x12 -60 %, 16x16 -80 %, layers 0-5": PruneSchedule(drop={5: 0.6, 6: 0.8}, layers=(0, 5), cache_scale=4),
    "D cache 12x12, 16x16 -75 %, layers 1-5": PruneSchedule(drop={6: 0.75}, layers=(1, 5), cache_scale=5),
    "E cache 12x12, 16x16 -85 %, layers 0-5": PruneSchedule(drop={6: 0.85}, layers=(0, 5), cache_scale=5),
    "F cache 8x8, 16x16 -75 %, layers 1-5": PruneSchedule(drop={6: 0.75}, layers=(1, 5), cache_scale=4),
    # stagevar on J with the guidance stop moved later than StageVAR's share rule puts it (8x8)
    "K J, projection scores, no guidance at 16x16": replace(J, selector="projection", cfg_stop=6),
    "L J, projection scores, no guidance from 12x12": replace(J, selector="projection", cfg_stop=5),
    # stagevar's two parts apart
    "M J, projection scores": replace(J, selector="projection"),
    "N J, no guidance from 8x8": replace(J, cfg_stop=4),
    "O J, no guidance at 16x16": replace(J, cfg_stop=6),
    # how J's cost grows with its drop ratio, its cache scale, and 16x16 skipped outright
    "P1 J at 16x16 -1 %": replace(J, drop={6: 0.01}),
    "P10 J at 16x16 -10 %": replace(J, drop={6: 0.1}),
    "P25 J at 16x16 -25 %": replace(J, drop={6: 0.25}),
    "P50 J at 16x16 -50 %": replace(J, drop={6: 0.5}),
    "Q J from 8x8": replace(J, cache_scale=4),
    "S 16x16 skipped": PruneSchedule(skip=frozenset({6})),
}


def score(pipe, name: str, prune, n: int) -> dict:
    """mini-GenEval of one schedule, printed as a line: its categories, numerics and FLOP ratio."""
    r = evaluate(pipe, n=n, prune=prune)
    ratio = r["cost_unpruned"]["transformer_gflops"] / r["cost"]["transformer_gflops"]
    print(f"{name:55s} overall {r['categories']['overall']:.3f}  {ratio:.2f}x fewer FLOPs  {r['categories']}", flush=True)
    return {"numerics": pipe.numerics, "flop_ratio": ratio, **r["categories"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="toy")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--only", nargs="*", default=None, help="candidate names' first words, e.g. unpruned preset C")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pipe, out = minivar.load(args.model), {}
    for name, prune in CANDIDATES.items():
        if args.only is not None and name.split()[0] not in args.only:
            continue
        out[name] = score(pipe, name, prune, args.n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
