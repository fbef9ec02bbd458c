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
`stages` below): guidance is dropped there (`cfg_stop`: the conditional rows run alone, halving the
batch), and tokens are chosen in a random low-dimensional projection of their features
(`selector="projection"`, `projection_scores`).

`PruneSchedule` says where each of these happens, in scale indices of a concrete schedule. The scale
loop asks a `Pruner` for one `runner` per (scale, layer), a `LayerRun` that `Block.forward` asks before
each sub-layer which tokens it computes (`pick`) and after it how the others are filled (`fill`);
`PruneSchedule.none()` gives `DENSE` everywhere, so the unpruned model is the same loop with an empty schedule.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from .config import TEMPLATES, InfinityConfig, scale_schedule


@dataclass
class PruneSchedule:
    """Where to prune, for one concrete scale schedule.

    drop:        scale index -> fraction of tokens dropped (K = L - int(drop * L) are computed)
    skip:        scale indices that are not run at all (100 % pruning); any but scale 0
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
        f, (first, last) = self.drop.get(si, 0.0), self.layers
        return L - int(f * L) if f > 0 and first <= layer <= last else L

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
        if len(set(self.skip)) >= n_scales:
            raise ValueError(f"the prune schedule skips all {n_scales} scales: at least one must run")
        if 0 in self.skip:  # the loop starts from the text's start token, a 1x1 grid
            raise ValueError(f"the prune schedule skips scale 0, the 1x1 scale that starts from the text: only "
                             f"scales 1..{n_scales - 1} may be skipped")
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

    It is drawn and orthonormalised on the CPU (in float64, which MPS lacks): every device gets the
    same matrix, and only its float32 copy moves to the device (`projection_scores`).
    """
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(width, min(rank, width), generator=gen, dtype=torch.float64, device="cpu")
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
    (`docs/bench/stagevar/README.md`). The product runs row by row, each row alone whatever the batch
    holds: a batched generation scores each image as a single one does.
    """
    proj = proj.to(x.device, x.dtype)
    sketch = torch.stack([row @ proj for row in centred(x, h, w)])      # B x (L, C) @ (C, r) -> (B, L, r)
    return sketch.pow_(2).sum(dim=-1)


def select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k highest scores per row, highest first."""
    return scores.topk(k, dim=1, largest=True, sorted=True).indices


def resize_tokens(x: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Tokens of one grid resized to another: x (B, hs*ws, C) -> (B, hd*wd, C), by F.interpolate's `mode`."""
    B, _, C = x.shape
    grid = x.view(B, *src, C).permute(0, 3, 1, 2)                        # (B, C, hs, ws)
    return F.interpolate(grid, size=dst, mode=mode).permute(0, 2, 3, 1).reshape(B, dst[0] * dst[1], C)


def restore(out_kept: torch.Tensor, keep: torch.Tensor, cached: torch.Tensor, cache_hw: tuple[int, int],
            hw: tuple[int, int]) -> torch.Tensor:
    """Full-length output: the cached output area-resized to (h, w), with the computed rows scattered in.

    out_kept (B, K, C), keep (B, K), cached (B, hc*wc, C) -> (B, h*w, C).
    """
    base = resize_tokens(cached, cache_hw, hw)
    rows = torch.arange(out_kept.shape[0], device=keep.device)[:, None]  # (B, 1): pairs with keep (B, K)
    base[rows, keep] = out_kept  # index_put_: twice as fast as scatter_ with a (B, K, C) index
    return base


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

    def runner(self, si: int, layer: int) -> LayerRun:
        """How `layer` runs at scale si: dense, storing its outputs (the cache scale), or on k tokens."""
        if si == self.s.cache_scale and self.s.layers[0] <= layer <= self.s.layers[1]:
            return LayerRun(self, si, layer)
        k = self.s.kept(si, layer, L := self.scales[si][0] * self.scales[si][1])
        return DENSE if k == L else LayerRun(self, si, layer, k)

    def keep_rows(self, rows: slice) -> None:
        """Keep some batch rows of the restoration cache (stage-aware CFG drops one half of a guided batch)."""
        self.cache = {key: out[rows] for key, out in self.cache.items()}



@dataclass(frozen=True)
class LayerRun:
    """How one layer runs its three sub-layers at one scale (`Pruner.runner`). Around each sub-layer,
    `Block.forward` asks `pick` for the tokens it computes and `fill` for its output on every token:

        DENSE            all tokens; the output as it is
        the cache scale  all tokens; the output is also kept, to restore later scales from
        a pruned scale   the k tokens of highest score; the others restored from the cache scale's output
    """
    pruner: Pruner | None = None
    si: int = 0
    layer: int = 0
    k: int | None = None    # tokens computed at a pruned scale (None: all of them)

    def pick(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x (B, L, C) -> keep (B, K) grid indices and their rows (B, K, C), or (None, x) for all tokens."""
        if self.k is None:
            return None, x
        p, scores = self.pruner, self.scores(x, name)
        keep = select(scores, self.k)                                     # (B, K)
        if p.record:
            rec = p.records.setdefault(self.si, ScaleRecord())
            rec.keep[self.layer, name], rec.scores[self.layer, name] = keep.cpu(), scores.float().cpu()
        return keep, x[torch.arange(x.shape[0], device=x.device)[:, None], keep]  # (B, K, C)

    def scores(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The selector's score of every token of x (B, L, C) before sub-layer `name` -> (B, L); the highest are kept."""
        p, (h, w) = self.pruner, self.pruner.scales[self.si]
        if p.s.selector == "random":
            return torch.rand(x.shape[:2], generator=p.rng, device="cpu").to(x.device)  # the same on any device
        if p.s.selector == "projection":
            if p.proj is None:  # one matrix for every layer and scale of the generation
                p.proj = projection_matrix(x.shape[-1], p.s.rank, p.seed)
            return projection_scores(x, h, w, p.proj)
        return pivotal_scores(x, h, w)

    def fill(self, out: torch.Tensor, keep: torch.Tensor | None, name: str) -> torch.Tensor:
        """The sub-layer's output `out` on the picked tokens -> its output on every token, (B, L, C)."""
        p = self.pruner
        if p is None:
            return out
        if keep is None:  # the cache scale: kept for the pruned scales that follow
            p.cache[self.layer, name] = out
            return out
        return restore(out, keep, p.cache[self.layer, name], p.scales[p.s.cache_scale], p.scales[self.si])


DENSE = LayerRun()


# ==================================================================================================
# Presets
#
# Pruning presets: turn `prune=True | "fastvar" | dict | PruneSchedule` into a `PruneSchedule`.
#
# `prune="fastvar"` is FastVAR's released recipe taken literally, whatever the model: absolute layers
# 3..27 (cut to the model's depth), scales 32 and 40 wide drop 40 % and 50 % of their tokens, the
# 576-token (24x24) scale is the restoration cache, and scales 48 or 64 wide are skipped. It is keyed
# on square grids, so other aspects are refused; it is what parity with FastVAR's code is checked against.
#
# `prune=True` is the same recipe expressed so that it transfers to every model, aspect and budget.
# Each scale is placed by its token count relative to the model's reference grid (the square grid at
# the model's native resolution, i.e. the budget `pn` of its config: 64x64 at 1024 on Infinity, 16x16
# for the toy), read on the scale's square twin (`square_twin`: the 1:1 grid at the same index, so
# that every aspect is treated at the same places), and the layer window is scaled with depth:
#
#     share r = tokens / reference tokens     1:1 at 1024 (Infinity-2B)
#     largest scale with r < 0.20             24x24 (r 0.14)      restoration cache
#     0.20 <= r < 0.32                        32x32 (r 0.25)      drop 40 %
#     0.32 <= r < 0.47                        40x40 (r 0.39)      drop 50 %
#     r >= 0.47                               48x48, 64x64        skipped
#     layers round(3/32 depth) .. round(27/32 depth)              3 .. 27 of 32
#
# On Infinity-2B at 1:1 and 1024 this reproduces FastVAR exactly; on 2:1 it picks 38x19 as the cache,
# 46x23 and 60x30 as pruned scales and skips 74x37 and 90x45, the same positions in the schedule
# (which 2:1's own shares would pick too); on the toy every aspect caches scale 3, drops 40 % of
# scale 4 and skips 5 and 6.
# Lower budgets prune only the scales that reach these shares (none at 256). Zero-shot high resolution
# (1344, 2048) keeps every scale, since skipping would throw away exactly what the extra scales add:
# scales with r >= 0.47 are computed on 25 % of their tokens instead.
#
# Small grids take FastVAR's other kind of recipe. FastVAR itself does not prune every backbone alike:
# on HART (14 scales, 64x64 at 1024) it skips nothing and, in every layer, computes 50 % of 48x48
# (r 0.56) and 25 % of 64x64 (r 1.0), restoring the rest from 36x36, the scale before them
# (`no_skip(..., from_share=0.47, drops=(0.5, 0.75))` is exactly that). A model whose native final grid
# is smaller than SMALL_GRID (the toy: 16x16) gets a recipe of that kind (`no_skip`) chosen, as FastVAR
# chose HART's, by measurement on the model: on a small grid an object is a few tokens wide and the
# large scales hold its edges, so skipping them loses objects (0.15 of the toy v3's mini-GenEval score),
# and so does pruning 12x12 at any ratio (0.02 to 0.03). The preset prunes only the scales of share
# r >= SMALL_GRID_FROM, the native final grid and any larger one, by SMALL_GRID_DROP in every layer,
# restored from the scale before them: on the toy, 16x16 computes 10 % of its tokens from 12x12's
# cache, 2.03x fewer transformer FLOPs (docs/toy/experiments.md, "The toy's own pruning preset"). It
# costs the toy v4 0.039 of mini-GenEval, and restoring only half of 16x16 already costs 0.037: the
# toy's last scale draws its objects' corners, and a restored token replays 12x12's correction there
# (same file, "Where the 16x16 pruning loses its score").
# Infinity's native grid is 64x64, so Infinity-2B and 8B keep the recipe above, at every budget.
#
# `stages` splits any schedule into StageVAR's three stages by the same share r (`model_stages`: on the
# square twin, like the presets), and
# `prune="stagevar"` is prune=True plus StageVAR's two refinement-stage accelerations (see `stagevar`).
# ==================================================================================================
CACHE_BELOW, DROP40_BELOW, DROP50_BELOW = 0.20, 0.32, 0.47
HIGH_RES_DROP = 0.75
SEMANTIC_BELOW, REFINEMENT_FROM = 0.08, CACHE_BELOW
STAGEVAR_RANK = 8
FASTVAR_LAYERS, FASTVAR_DEPTH = (3, 27), 32
SMALL_GRID = 32 * 32          # native final grids with fewer tokens get `no_skip`
SMALL_GRID_FROM, SMALL_GRID_DROP = 1.0, 0.9  # ... pruning the scales of share >= 1.0, 90 % of their tokens


def stages(scales: list[tuple[int, int]], reference_tokens: int, semantic_below: float = SEMANTIC_BELOW,
           refinement_from: float = REFINEMENT_FROM) -> list[str]:
    """Each scale's stage: "semantic", "structure" or "refinement", by its share r = tokens / reference tokens.

    StageVAR (FasterVAR, arXiv 2512.16483) finds three stages in a VAR generation: the early scales
    decide what the picture shows (its CLIP and DINO scores plateau after the 16x16 scale of
    Infinity at 1024), the middle ones its structure (LPIPS and DISTS converge around 32x32), and
    the late ones only refine fidelity. Placed by share of the reference grid, like the pruning
    preset, so that it transfers to every template, budget and model:

        share r                 1:1 at 1024 (64x64 reference)     stage
        r < 0.08                1 .. 16x16 (r <= 0.06)            semantic
        0.08 <= r < 0.20        20x20, 24x24 (r 0.10, 0.14)       structure
        r >= 0.20               32x32 .. 64x64 (r >= 0.25)        refinement

    The refinement stage starts exactly where the FastVAR band of `proportional` starts pruning or
    skipping (r >= CACHE_BELOW), so the restoration cache is always the last structure scale and every
    pruned or skipped scale is a refinement scale. The toy (16x16 reference) has 1, 2, 4 semantic, 6x6
    structure and 8x8, 12x12, 16x16 refinement; any schedule at 256 on Infinity is all semantic.
    """
    shares = [h * w / reference_tokens for h, w in scales]
    return ["semantic" if r < semantic_below else "structure" if r < refinement_from else "refinement" for r in shares]


def model_stages(cfg: InfinityConfig, scales: list[tuple[int, int]]) -> list[str]:
    """`stages` of any template's schedule, read on its square twin against the model's own reference grid."""
    return stages(square_twin(scales), reference_tokens(cfg, 1.0))


def stagevar(scales: list[tuple[int, int]], depth: int, reference_tokens: int, rank: int = STAGEVAR_RANK,
             refinement_from: float = REFINEMENT_FROM) -> PruneSchedule:
    """prune=True's drops, skips, cache and layer window, plus StageVAR's refinement-stage accelerations:
    tokens chosen in a rank-`rank` random projection (`selector="projection"`) and guidance dropped
    from the first refinement scale on (`cfg_stop`; None when the schedule has no refinement scale)."""
    base = preset(scales, depth, reference_tokens)
    labels = stages(scales, reference_tokens, refinement_from=refinement_from)
    stop = next((si for si, st in enumerate(labels) if st == "refinement"), None)
    return replace(base, selector="projection", rank=rank, cfg_stop=stop)


def fastvar_literal(scales: list[tuple[int, int]]) -> PruneSchedule:
    """FastVAR's recipe exactly as released: triggers are literal widths and a literal token count.

    Those widths mean something only on square grids (on h/w 0.75 "48 wide" is the middle 36x48 of
    three large scales), so any other schedule is refused: prune=True is the recipe for every aspect.
    """
    if any(h != w for h, w in scales):
        ratio = scales[-1][0] / scales[-1][1]
        raise ValueError(f"prune='fastvar' is FastVAR's literal recipe for square (h/w 1.0) schedules; this one "
                         f"is h/w {ratio:.3g}: use prune=True, which places the same recipe on every aspect")
    drop = {si: {32: 0.4, 40: 0.5}[w] for si, (h, w) in enumerate(scales) if w in (32, 40)}
    skip = frozenset(si for si, (h, w) in enumerate(scales) if w in (48, 64))
    cache = next((si for si, (h, w) in enumerate(scales) if h * w == 576), None)
    if drop and cache is None:
        raise ValueError("prune='fastvar' needs a 24x24 scale to cache (FastVAR's recipe is for 1:1 "
                         "schedules); use prune=True for other aspect ratios")
    return PruneSchedule(drop=drop, skip=skip, layers=FASTVAR_LAYERS, cache_scale=cache)


def proportional(scales: list[tuple[int, int]], depth: int, reference_tokens: int) -> PruneSchedule:
    """FastVAR's recipe placed by token share and depth fraction (see the module docstring)."""
    shares = [h * w / reference_tokens for h, w in scales]
    high_res = shares[-1] > 1.0
    drop, skip = {}, set()
    for si, r in enumerate(shares):
        if DROP40_BELOW > r >= CACHE_BELOW:
            drop[si] = 0.4
        elif DROP50_BELOW > r >= DROP40_BELOW:
            drop[si] = 0.5
        elif r >= DROP50_BELOW:
            drop.update({si: HIGH_RES_DROP}) if high_res else skip.add(si)
    cached = [si for si, r in enumerate(shares) if r < CACHE_BELOW]
    if not drop or not cached:
        return PruneSchedule(skip=frozenset(skip))
    first, last = (round(x / FASTVAR_DEPTH * depth) for x in FASTVAR_LAYERS)
    layers = (first, min(last, depth - 1))  # shallow models (depth <= 3) round past their last layer
    return PruneSchedule(drop=drop, skip=frozenset(skip), layers=layers, cache_scale=cached[-1])


def no_skip(scales: list[tuple[int, int]], depth: int, reference_tokens: int, from_share: float = SMALL_GRID_FROM,
            drops: tuple[float, float] = (SMALL_GRID_DROP, SMALL_GRID_DROP)) -> PruneSchedule:
    """A recipe of FastVAR's HART kind: every scale of token share r >= `from_share` is pruned in every
    layer, the last one by drops[1] and the others by drops[0], and restored from the scale before the
    first of them. Nothing is skipped. With from_share 0.47 and drops (0.5, 0.75) it is HART's own."""
    pruned = [si for si, (h, w) in enumerate(scales) if h * w / reference_tokens >= from_share and si > 0]
    if not pruned:
        return PruneSchedule.none()
    drop = {si: drops[1] if si == len(scales) - 1 else drops[0] for si in pruned}
    return PruneSchedule(drop=drop, layers=(0, depth - 1), cache_scale=pruned[0] - 1)


def preset(scales: list[tuple[int, int]], depth: int, reference_tokens: int) -> PruneSchedule:
    """prune=True's schedule: `no_skip` for models whose native final grid is under SMALL_GRID tokens,
    `proportional` (FastVAR's Infinity recipe) for the others."""
    rule = no_skip if reference_tokens < SMALL_GRID else proportional
    return rule(scales, depth, reference_tokens)


def reference_tokens(cfg: InfinityConfig, template: float) -> int:
    """Tokens of the model's native final grid for this aspect template: the template's own last grid
    at the budget the model was trained at (`cfg.pn`): 64x64 for Infinity at 1:1 (1M), 16x16 for the
    toy (0.06M), 20x16 for the toy at h/w 1.25. It follows from the config, never from a name."""
    h, w = scale_schedule(cfg.pn, template)[-1]
    return h * w


def square_twin(scales: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The grid of the square (1:1) template at each index of `scales`.

    Every template of a budget has the same number of scales, and the scale at index i plays the same
    part in each of them. The presets therefore read each scale's share on its square twin, so that
    every aspect is pruned at the same places (on Infinity's 13 scales the aspects' own shares agree
    anyway; on the toy's 7 they would not: h/w 1.5 would prune nothing and 1.75 would prune two
    scales). Past the 1M list (zero-shot high resolution) the twin is the square of equal area.
    """
    square = TEMPLATES[1.0]
    return [square[i] if i < len(square) else (round(math.sqrt(h * w)),) * 2 for i, (h, w) in enumerate(scales)]


def resolve_prune(prune, cfg: InfinityConfig, scales: list[tuple[int, int]]) -> PruneSchedule:
    """Accepts False/None (no pruning), True (the preset), "fastvar", "stagevar", a dict or a PruneSchedule.

    A schedule the caller gives (a PruneSchedule or a dict) is validated against `scales` here; the
    presets fit every schedule by construction (tests/test_pruning.py checks them on every template).
    """
    if prune is None or prune is False:
        return PruneSchedule.none()
    if isinstance(prune, (PruneSchedule, dict)):
        schedule = prune if isinstance(prune, PruneSchedule) else schedule_from_dict(prune, cfg.depth)
        schedule.validate(len(scales), cfg.depth)
        return schedule
    if prune is True or prune == "preset":
        return preset(square_twin(scales), cfg.depth, reference_tokens(cfg, 1.0))
    if prune == "stagevar":
        return stagevar(square_twin(scales), cfg.depth, reference_tokens(cfg, 1.0))
    if prune == "fastvar":  # FastVAR's absolute window, cut to the layers the model has
        literal = fastvar_literal(scales)
        return replace(literal, layers=(literal.layers[0], min(literal.layers[1], cfg.depth - 1)))
    raise ValueError(f"prune={prune!r} is not understood: use False, True, 'fastvar', 'stagevar', a dict or a PruneSchedule")


def schedule_from_dict(d: dict, depth: int) -> PruneSchedule:
    """A PruneSchedule from its fields as a dict (JSON-friendly: scale keys may be digit strings)."""
    names = {f.name for f in fields(PruneSchedule)}
    if unknown := sorted(set(d) - names, key=str):
        raise ValueError(f"unknown prune schedule fields {unknown}; expected {sorted(names)}")
    drop, skip, layers = d.get("drop", {}), d.get("skip", ()), d.get("layers", (0, depth - 1))
    if not isinstance(drop, dict):
        raise ValueError(f"prune['drop']={drop!r} is invalid: use a dict {{scale index: drop ratio}}")
    if isinstance(skip, (str, bytes, dict)) or not isinstance(skip, (set, frozenset, list, tuple)):
        raise ValueError(f"prune['skip']={skip!r} is invalid: use a list or set of scale indices")
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"prune['layers']={layers!r} is invalid: use (first, last) layer indices")
    kw = {**d, "drop": {scale_key(k): v for k, v in drop.items()}, "skip": frozenset(skip), "layers": tuple(layers)}
    return PruneSchedule(**kw)


def scale_key(k):
    """JSON object keys are strings: "9" means scale 9. Anything else is left for `validate` to judge."""
    return int(k) if isinstance(k, str) and k.isdigit() else k
