"""Does the toy preset lose its score in *which* tokens it computes, or in how the others are restored?

    python tools/toy_restore_variants.py [MODEL] [--n 1000] [--only NAME ...] [--json out.json]

Every arm is the toy preset's schedule (16x16 computes 10 % of its tokens in all six layers, restored
from 12x12; `J` in tools/toy_prune_candidates.py) with one part of FastVAR's step swapped for another:

    selectors   which tokens are computed
      pivotal     FastVAR's: farthest from the scale's mean token (the preset)
      local       farthest from the mean of their 3x3 neighbourhood (a high-pass: edges and corners)
      residual    farthest from the cache scale's input to the same sub-layer at the same place
                  (area-resized): where the cache is likely to restore worst
      random      any (the ablation `PruneSchedule(selector="random")`)
    restoration how the others are filled
      area        FastVAR's area resize of the cache (the preset)
      nearest, bilinear   other resizes of the same cache
      shifted     the area resize plus the mean gap between the computed rows and the cache at them
      zero        no restoration: a pruned token skips the sub-layer (its residual stream passes unchanged,
                  as in token dropping)
      oracle      a diagnostic, not a method: the unpruned run's own 16x16 outputs at the pruned tokens
                  (each generate call runs twice, first on every token, recording). What is left of the
                  cost is that of computing the kept tokens without the others

The variants are patched into `minivar.model.pruning` for the length of one arm (`variant`: the selector's
`LayerRun.scores`, `restore`, and for the oracle `LayerRun.fill` and the pipeline's `generate`), so the rest
of the scale loop (token gather, records), the prompts, seeds and the FLOP count are the preset's. Results
and the commands that produced them: docs/toy/experiments.md, "Where the 16x16 pruning loses its score".
"""
from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import replace

import torch
import torch.nn.functional as F

import minivar
from minivar.model import pruning
from toy_prune_candidates import J, score  # the script's own folder is on sys.path

ARMS = {  # name: (selector, restoration)
    "pivotal": ("pivotal", "area"),
    "local": ("local", "area"),
    "residual": ("residual", "area"),
    "random": ("random", "area"),
    "nearest": ("pivotal", "nearest-exact"),
    "bilinear": ("pivotal", "bilinear"),
    "shifted": ("pivotal", "shifted"),
    "zero": ("pivotal", "zero"),
    "oracle": ("pivotal", "oracle"),
}


def local_scores(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Squared distance of every token of x (B, h*w, C) to its 3x3 neighbourhood mean -> (B, h*w)."""
    B, L, C = x.shape
    grid = x.float().view(B, h, w, C).permute(0, 3, 1, 2)
    mean = F.avg_pool2d(grid, 3, stride=1, padding=1, count_include_pad=False)
    return (grid - mean).pow(2).sum(1).reshape(B, L)


@contextlib.contextmanager
def variant(selector: str, restoration: str, pipe):
    """Patch `pruning`'s token choice and restoration for one arm; the preset's own ones come back after."""
    plain_pick, plain_scores, plain_restore = pruning.LayerRun.pick, pruning.LayerRun.scores, pruning.restore
    plain_fill, plain_generate = pruning.LayerRun.fill, pipe.generate
    recorded, recording = {}, [False]  # the oracle's unpruned outputs of the pruned scale, by (layer, sub-layer)

    def pick(self, x, name):
        if self.k is None and self.pruner is not None and selector == "residual":
            self.pruner.cache["input", self.layer, name] = x  # the cache scale's input to this sub-layer
        if self.k is not None and recording[0]:
            return None, x  # the oracle's first run: the pruned scale computes every token
        return plain_pick(self, x, name)

    def fill(self, out, keep, name):
        if restoration != "oracle" or self.k is None:
            return plain_fill(self, out, keep, name)
        if recording[0]:
            recorded[self.layer, name] = out
            return out
        base = recorded[self.layer, name].clone()
        base[torch.arange(out.shape[0], device=keep.device)[:, None], keep] = out
        return base

    def generate(*args, **kwargs):
        """The oracle's generate: the same call on every token first (recorded), then pruned."""
        recording[0] = True
        try:
            plain_generate(*args, **kwargs)
        finally:
            recording[0] = False
        return plain_generate(*args, **kwargs)

    def scores(self, x, name):
        p, hw = self.pruner, self.pruner.scales[self.si]
        if selector == "local":
            return local_scores(x, *hw)
        if selector == "residual":
            cached = pruning.resize_tokens(p.cache["input", self.layer, name], p.scales[p.s.cache_scale], hw)
            return (x - cached).float().pow(2).sum(-1)
        return plain_scores(self, x, name)

    def restore(out_kept, keep, cached, cache_hw, hw):
        if restoration == "area":
            return plain_restore(out_kept, keep, cached, cache_hw, hw)
        if restoration == "zero":
            base = out_kept.new_zeros(out_kept.shape[0], hw[0] * hw[1], out_kept.shape[-1])
        else:
            base = pruning.resize_tokens(cached, cache_hw, hw, "area" if restoration == "shifted" else restoration)
        rows = torch.arange(out_kept.shape[0], device=keep.device)[:, None]
        if restoration == "shifted":
            base = base + (out_kept - base[rows, keep]).mean(1, keepdim=True)
        base[rows, keep] = out_kept
        return base

    pruning.LayerRun.pick, pruning.LayerRun.scores, pruning.restore, pruning.LayerRun.fill = pick, scores, restore, fill
    if restoration == "oracle":
        pipe.generate = generate
    try:
        yield
    finally:
        pruning.LayerRun.pick, pruning.LayerRun.scores, pruning.restore = plain_pick, plain_scores, plain_restore
        pruning.LayerRun.fill = plain_fill
        vars(pipe).pop("generate", None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="toy")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--only", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    pipe, out = minivar.load(a.model), {}
    for name in a.only:
        selector, restoration = ARMS[name]
        # "random" is the library's own selector; the two new ones ride on "pivotal" and are swapped in by `variant`
        schedule = replace(J, selector="random" if selector == "random" else "pivotal")
        with variant(selector, restoration, pipe):
            out[name] = score(pipe, name, schedule, a.n)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
