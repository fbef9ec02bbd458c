"""Which branch should run once guidance stops: the conditional one (minivar) or the null prompt's?

    python tools/stagevar_branch.py --n 1000

StageVAR's descriptions run the refinement stage without text conditioning (guidance scale 0, the null
prompt). minivar keeps the conditional rows instead (`PruneSchedule.cfg_stop_branch`). This script
scores both on the toy's mini-GenEval with the same prompts and seeds, for guidance stopped at the
refinement stage with no pruning and for the stagevar preset.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import minivar
from minivar.model.pruning import reference_tokens, resolve_prune, stagevar
from minivar.model.pruning import BRANCHES
from minivar.toy.geneval import evaluate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args(argv)
    pipe = minivar.load("toy")
    cfg, scales = pipe.transformer.cfg, pipe.schedule(None, 1.0)
    preset = stagevar(scales, cfg.depth, reference_tokens(cfg, 1.0))
    arms = {"CFG stop alone": replace(resolve_prune(False, cfg, scales), cfg_stop=preset.cfg_stop), "stagevar": preset}
    print(f"| setting | conditional branch | null-prompt branch |  (mini-GenEval, n={a.n})")
    print("|---|---:|---:|")
    for label, prune in arms.items():
        scores = []
        for branch in BRANCHES:
            scores.append(evaluate(pipe, n=a.n, prune=replace(prune, cfg_stop_branch=branch), psnr_scenes=1)["overall"])
        print(f"| {label} | {scores[0]:.3f} | {scores[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
