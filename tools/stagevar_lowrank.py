"""StageVAR's low-rank premise on the toy: how much of each scale's (centred) token features the top-8
principal directions hold, and how far a rank-r projection keeps the tokens pivotal selection keeps.

    python tools/stagevar_lowrank.py

Hidden states are the outputs of blocks 0..2 (the inputs of the pruned sub-layers of blocks 1..3), the
conditional row, unpruned runs of four prompts at seed 0. At the 8x8 scale (the toy's pruned one, 39 of
64 tokens kept) the kept set of `projection_scores` is compared with `pivotal_scores`'; a random choice
would overlap by 39/64 = 61 % on average.
"""
from __future__ import annotations

import numpy as np
import torch

import minivar
from minivar.bench.analysis import capture_hidden
from minivar.model.pruning import pivotal_scores, projection_matrix, projection_scores, select

PROMPTS = ["a red circle", "two green squares", "three purple diamonds", "a blue triangle above a yellow circle"]
RANKS = (1, 2, 4, 8, 32)


def main() -> None:
    pipe = minivar.load("toy")
    energy: dict[tuple[int, int], list[float]] = {}
    overlap: dict[int, list[float]] = {r: [] for r in RANKS}
    for prompt in PROMPTS:
        with capture_hidden(pipe.transformer, [0, 1, 2]) as states:
            out = pipe.generate(prompt, seed=0, trace=True, output_type="latent")
        for li in states:
            for step, (h, w) in enumerate(out.trace.scales[1:], start=1):  # 1x1 has no spread
                x = states[li][step][:1]                                     # (1, L, C)
                s = torch.linalg.svdvals((x[0] - x[0].mean(0)).double()) ** 2
                energy.setdefault((h, w), []).append(float(s[:8].sum() / s.sum()))
                if (h, w) == (8, 8):
                    k = h * w - int(0.4 * h * w)
                    pivotal = set(select(pivotal_scores(x, h, w), k)[0].tolist())
                    for r in RANKS:
                        proj = projection_matrix(x.shape[-1], r, seed=1)
                        kept = set(select(projection_scores(x, h, w, proj), k)[0].tolist())
                        overlap[r].append(len(pivotal & kept) / k)
    for (h, w), e in energy.items():
        print(f"{h:>2d}x{w:<2d}: the top 8 of {pipe.transformer.cfg.embed_dim} directions hold {100 * np.mean(e):.1f} % "
              "of the centred feature energy")
    for r, o in overlap.items():
        print(f"rank {r:>2d}: kept set overlaps pivotal's by {100 * np.mean(o):.1f} % at 8x8")


if __name__ == "__main__":
    main()
