"""FastVAR's cached token pruning, as a step of the scale loop.

Three observations make the large scales of a VAR model cheap to approximate (FastVAR, arXiv 2503.23367):
the large scales dominate the cost, they mostly add high-frequency detail, and a token's sub-layer
output at a large scale is close to the output at the same place of an earlier scale. So at a pruned
scale, inside a window of layers, each sub-layer (self-attention, cross-attention, FFN):

1. scores every token by its squared distance to the scale's mean token (a cheap high-frequency
   detector) and keeps the top K ("pivotal tokens"); the choice is made again before every sub-layer;
2. computes the sub-layer on the kept tokens only (their keys alone enter the KV cache);
3. fills the other positions with the same sub-layer's output at the *cache scale*, area-resized to
   the current grid ("cached token restoration").

The last scales can also be skipped outright: their residual is simply missing from the latent.

StageVAR (arXiv 2512.16483) adds two things for the late, fidelity-refinement scales (see
`presets.stages`): guidance is dropped there (`cfg_stop`: the conditional rows run alone, halving the
batch), and tokens are chosen in a random low-dimensional projection of their features
(`selector="projection"`, `projection_scores`).

`PruneSchedule` says where each of these happens, in scale indices of a concrete schedule. The scale
loop asks a `Pruner` for one `runner` per (scale, layer); `PruneSchedule.none()` gives the dense
runner everywhere, so the unpruned model is the same loop with an empty schedule.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .numerics import per_image
from .transformer import dense


@dataclass
class PruneSchedule:
    """Where to prune, for one concrete scale schedule.

    drop:        scale index -> fraction of tokens dropped (K = L - int(drop * L) are computed)
    skip:        scale indices that are not run at all (100 % pruning)
    layers:      inclusive (first, last) window of global layer indices where `drop` applies
    cache_scale: scale index whose sub-layer outputs restore the dropped tokens
    selector:    "pivotal" (FastVAR's distance from the mean token), "projection" (the same distance
                 estimated in a random rank-`rank` projection, StageVAR) or "random" (ablation)
    rank:        dimensions of the "projection" selector's random projection
    cfg_stop:    scale index from which guidance is dropped (one branch only), or None; an
                 explicit `cfg_stop_scale` of the generation wins over it (`guidance_stop`)
    cfg_stop_branch: which half of the guided batch runs on after the stop: "conditional" (the
                 prompt's rows, guidance scale 1) or "unconditional" (the negative or null prompt's
                 rows, guidance scale 0, as StageVAR describes it). Measured on the toy
                 (`tools/stagevar_branch.py`, mini-GenEval, 1000 prompts, no pruning): 0.267 for the
                 conditional rows against 0.185 for the null prompt's (unpruned 0.281), hence the default.
    """
    drop: dict[int, float] = field(default_factory=dict)
    skip: frozenset[int] = frozenset()
    layers: tuple[int, int] = (0, -1)
    cache_scale: int | None = None
    selector: str = "pivotal"
    rank: int = 8
    cfg_stop: int | None = None
    cfg_stop_branch: str = "conditional"

    @classmethod
    def none(cls) -> PruneSchedule:
        return cls()

    @property
    def prunes(self) -> bool:
        return any(f > 0 for f in self.drop.values())

    def ran(self, n_scales: int) -> list[int]:
        """Indices of the scales that run, of a schedule of n_scales (the skipped ones left out)."""
        return [si for si in range(n_scales) if si not in self.skip]

    def guidance_stop(self, cfg_stop_scale: int | None) -> int | None:
        """The scale from which CFG is dropped: the caller's `cfg_stop_scale` if given, else the schedule's."""
        return self.cfg_stop if cfg_stop_scale is None else cfg_stop_scale

    def in_window(self, layer: int) -> bool:
        return self.layers[0] <= layer <= self.layers[1]

    def kept(self, si: int, layer: int, L: int) -> int:
        """Tokens computed at scale si in `layer` out of L."""
        f = self.drop.get(si, 0.0)
        return L - int(f * L) if f > 0 and self.in_window(layer) else L

    def validate(self, n_scales: int, depth: int) -> None:
        """Raise one ValueError line unless the schedule fits n_scales scales and `depth` layers."""
        if not isinstance(self.drop, dict) or not isinstance(self.skip, (set, frozenset, list, tuple)):
            raise ValueError(f"prune schedule needs drop as a dict {{scale: ratio}} and skip as a set of scales, "
                             f"got drop={self.drop!r}, skip={self.skip!r}")
        for si in [*self.drop, *self.skip]:
            if not is_index(si) or not 0 <= si < n_scales:
                raise ValueError(f"prune schedule names scale {si!r}, but the scale schedule has scales "
                                 f"0..{n_scales - 1}")
        for si, f in self.drop.items():
            if not is_real(f) or not 0 <= f < 1:
                raise ValueError(f"prune drop ratio {f!r} at scale {si} is invalid: use a fraction in [0, 1)")
        if len(self.skip) >= n_scales:
            raise ValueError(f"the prune schedule skips all {n_scales} scales: at least one must run")
        self._validate_selector(n_scales)
        pruned = sorted(si for si, f in self.drop.items() if f > 0)
        if both := sorted(set(self.skip) & set(pruned)):
            raise ValueError(f"prune schedule both skips and prunes scales {both}: a scale is one or the other")
        self._validate_cache(n_scales, pruned)
        if pruned:
            self._validate_layers(depth)

    def _validate_selector(self, n_scales: int) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"unknown prune selector {self.selector!r}: use one of {', '.join(map(repr, SELECTORS))}")
        if not is_index(self.rank) or self.rank < 1:
            raise ValueError(f"prune rank={self.rank!r} is invalid: use a whole number of projection dimensions >= 1")
        if self.cfg_stop_branch not in BRANCHES:
            raise ValueError(f"prune cfg_stop_branch={self.cfg_stop_branch!r} is invalid: use "
                             f"{' or '.join(map(repr, BRANCHES))}")
        c = self.cfg_stop
        if c is not None and (not is_index(c) or not 0 <= c <= n_scales):
            raise ValueError(f"prune cfg_stop={c!r} is invalid: use a scale index 0..{n_scales - 1}, "
                             f"{n_scales} or None (no stop)")

    def _validate_cache(self, n_scales: int, pruned: list[int]) -> None:
        c = self.cache_scale
        if c is not None and (not is_index(c) or not 0 <= c < n_scales):
            raise ValueError(f"prune cache_scale={c!r} is out of range: use a scale index 0..{n_scales - 1}")
        if c is not None and c in self.skip:
            raise ValueError(f"prune cache_scale={c} is a skipped scale (skip={sorted(self.skip)}): the "
                             "restoration cache must come from a scale that runs")
        if pruned and (c is None or c >= pruned[0]):
            raise ValueError(f"pruned scales {pruned} need a cache scale before them (got cache_scale={c})")

    def _validate_layers(self, depth: int) -> None:
        w = self.layers
        ok = isinstance(w, (tuple, list)) and len(w) == 2 and all(is_index(v) for v in w)
        if not ok or not 0 <= w[0] <= w[1] < depth:
            raise ValueError(f"prune layer window {w!r} is invalid for a model of depth {depth}: use "
                             f"(first, last) with 0 <= first <= last <= {depth - 1}")


SELECTORS = ("pivotal", "projection", "random")
BRANCHES = ("conditional", "unconditional")  # the halves of a guided batch, in row order


def is_index(v) -> bool:
    """An integer (Python or numpy), but not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A finite real number (Python or numpy), but not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def pivotal_scores(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Squared L2 distance of every token of x (B, h*w, C) to the scale's mean token -> (B, h*w)."""
    return centred(x, h, w).pow_(2).sum(dim=-1)  # squared in place: the same numbers, one (B, L, C) buffer fewer


def centred(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Every token of x (B, h*w, C) minus the scale's mean token (its h x w grid average)."""
    B, L, C = x.shape
    grid = x.view(B, h, w, C).permute(0, 3, 1, 2)                       # (B, C, h, w)
    return x - F.adaptive_avg_pool2d(grid, (1, 1)).permute(0, 2, 3, 1).view(B, 1, C)


def projection_matrix(width: int, rank: int, seed: int) -> torch.Tensor:
    """A fixed random projection (width, min(rank, width)) with orthonormal columns, drawn from its own
    seeded generator (the sampling stream is untouched): a Gaussian matrix, orthonormalised by QR.

    Orthonormal columns make the sketch an exact rotation when rank >= width, so the projected score
    then ranks tokens as `pivotal_scores` does (up to rounding); below that it is the usual
    Johnson-Lindenstrauss estimate, with less variance than a raw Gaussian matrix.
    """
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(width, min(rank, width), generator=gen, dtype=torch.float64)
    return torch.linalg.qr(gauss).Q.float()                             # (width, r)


def projection_scores(x: torch.Tensor, h: int, w: int, proj: torch.Tensor) -> torch.Tensor:
    """StageVAR's low-rank token scores: x (B, h*w, C) minus the scale's mean token, projected on
    proj (C, r); the squared norm of the r-dimensional sketch -> (B, h*w).

    The paper works in a random projection of the features instead of the full width (the features of
    the refinement scales are close to low-rank, so a few directions carry the spread), computes
    representative tokens and restores the rest, with a fixed rank chosen from offline statistics. The
    parts of it we could read do not give the score that picks the representatives; we take the JL
    estimate of FastVAR's pivotal score, so the selector differs from "pivotal" only in the projection,
    and restoration is FastVAR's cache. Rank 8 is the flat part of the toy's rank sweep
    (`docs/bench/stagevar/README.md`). The product runs image by image (`per_image`): a batched
    generation scores each image as a single one does.
    """
    sketch = per_image(lambda t: t @ proj.to(t.device, t.dtype), centred(x, h, w))  # (B, L, r)
    return sketch.pow_(2).sum(dim=-1)


def select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k highest scores per row, highest first."""
    return scores.topk(k, dim=1, largest=True, sorted=True).indices


def restore(out_kept: torch.Tensor, keep: torch.Tensor, cached: torch.Tensor, cache_hw: tuple[int, int],
            hw: tuple[int, int]) -> torch.Tensor:
    """Full-length output: the cached output area-resized to (h, w), with the computed rows scattered in.

    out_kept (B, K, C), keep (B, K), cached (B, hc*wc, C) -> (B, h*w, C).
    """
    B, K, C = out_kept.shape
    (hc, wc), (h, w) = cache_hw, hw
    base = cached.view(B, hc, wc, C).permute(0, 3, 1, 2)                 # (B, C, hc, wc)
    base = F.interpolate(base, size=(h, w), mode="area").permute(0, 2, 3, 1).reshape(B, h * w, C)
    base[batch_rows(B, keep.device), keep] = out_kept  # index_put_: twice as fast as scatter_ with a (B, K, C) index
    return base


def batch_rows(B: int, device: torch.device) -> torch.Tensor:
    """(B, 1) row numbers that pair with (B, K) token indices in advanced indexing: x[rows, keep] is (B, K, C)."""
    return torch.arange(B, device=device)[:, None]


@dataclass
class ScaleRecord:
    """What pruning did at one scale: kept indices and scores per (layer, sub-layer)."""
    keep: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    scores: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


class Pruner:
    """Holds the restoration cache of one generation and hands out a runner per (scale, layer)."""

    def __init__(self, schedule: PruneSchedule, scales: list[tuple[int, int]], seed: int = 0,
                 record: bool = False):
        self.s, self.scales, self.record = schedule, scales, record
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        self.records: dict[int, ScaleRecord] = {}
        self.rng = torch.Generator().manual_seed(seed) if schedule.selector == "random" else None
        self.seed, self.proj = seed, None  # the projection is drawn at the first pruned sub-layer (width known)

    def runs(self, si: int) -> bool:
        return si not in self.s.skip

    def runner(self, si: int, layer: int):
        if not self.s.in_window(layer):
            return dense
        if si == self.s.cache_scale:
            return lambda name, x, fn: self._store(layer, name, fn(x, None))
        k = self.s.kept(si, layer, x_len := self.scales[si][0] * self.scales[si][1])
        if k == x_len:
            return dense
        return lambda name, x, fn: self._pruned(si, layer, name, x, fn, k)

    def keep_rows(self, rows: slice) -> None:
        """Keep some batch rows of the restoration cache (stage-aware CFG drops one half of a guided batch)."""
        self.cache = {key: out[rows] for key, out in self.cache.items()}

    def _store(self, layer: int, name: str, out: torch.Tensor) -> torch.Tensor:
        self.cache[layer, name] = out
        return out

    def _pruned(self, si, layer, name, x, fn, k):
        h, w = self.scales[si]
        scores = self._scores(x, h, w)
        keep = select(scores, k)                                          # (B, K)
        if self.record:
            rec = self.records.setdefault(si, ScaleRecord())
            rec.keep[layer, name], rec.scores[layer, name] = keep.cpu(), scores.float().cpu()
        kept = x[batch_rows(x.shape[0], x.device), keep]                 # (B, K, C)
        out = fn(kept, keep)
        return restore(out, keep, self.cache[layer, name], self.scales[self.s.cache_scale], (h, w))

    def _scores(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if self.s.selector == "random":
            return torch.rand(x.shape[:2], generator=self.rng).to(x.device)
        if self.s.selector == "projection":
            if self.proj is None:  # one matrix for every layer and scale of the generation
                self.proj = projection_matrix(x.shape[-1], self.s.rank, self.seed)
            return projection_scores(x, h, w, self.proj)
        return pivotal_scores(x, h, w)
