"""Pruning presets: turn `prune=True | "fastvar" | dict | PruneSchedule` into a `PruneSchedule`.

`prune="fastvar"` is FastVAR's released recipe taken literally, whatever the model: absolute layers
3..27 (cut to the model's depth), scales 32 and 40 wide drop 40 % and 50 % of their tokens, the
576-token (24x24) scale is the restoration cache, and scales 48 or 64 wide are skipped. It is keyed
on square grids, so other aspects are refused; it is what parity with FastVAR's code is checked against.

`prune=True` is the same recipe expressed so that it transfers to every model, aspect and budget.
Each scale is placed by its token count relative to the model's reference grid (the square grid at
the model's native resolution, i.e. the budget `pn` of its config: 64x64 at 1024 on Infinity, 16x16
for the toy), read on the scale's square twin (`square_twin`: the 1:1 grid at the same index, so
that every aspect is treated at the same places), and the layer window is scaled with depth:

    share r = tokens / reference tokens     1:1 at 1024 (Infinity-2B)
    largest scale with r < 0.20             24x24 (r 0.14)      restoration cache
    0.20 <= r < 0.32                        32x32 (r 0.25)      drop 40 %
    0.32 <= r < 0.47                        40x40 (r 0.39)      drop 50 %
    r >= 0.47                               48x48, 64x64        skipped
    layers round(3/32 depth) .. round(27/32 depth)              3 .. 27 of 32

On Infinity-2B at 1:1 and 1024 this reproduces FastVAR exactly; on 2:1 it picks 38x19 as the cache,
46x23 and 60x30 as pruned scales and skips 74x37 and 90x45, the same positions in the schedule
(which 2:1's own shares would pick too); on the toy every aspect caches scale 3, drops 40 % of
scale 4 and skips 5 and 6.
Lower budgets prune only the scales that reach these shares (none at 256). Zero-shot high resolution
(1344, 2048) keeps every scale, since skipping would throw away exactly what the extra scales add:
scales with r >= 0.47 are computed on 25 % of their tokens instead.

`stages` splits any schedule into StageVAR's three stages by the same share r (`model_stages`: on the
square twin, like the presets), and
`prune="stagevar"` is prune=True plus StageVAR's two refinement-stage accelerations (see `stagevar`).
"""
from __future__ import annotations

import math
from dataclasses import fields, replace

from .config import TEMPLATES, InfinityConfig, scale_schedule
from .pruning import PruneSchedule

CACHE_BELOW, DROP40_BELOW, DROP50_BELOW = 0.20, 0.32, 0.47
HIGH_RES_DROP = 0.75
SEMANTIC_BELOW, REFINEMENT_FROM = 0.08, CACHE_BELOW
STAGEVAR_RANK = 8
FASTVAR_LAYERS, FASTVAR_DEPTH = (3, 27), 32


def stage_of(share: float, semantic_below: float = SEMANTIC_BELOW, refinement_from: float = REFINEMENT_FROM) -> str:
    """The stage of a scale whose token count is `share` of the reference grid's (see `stages`)."""
    if share < semantic_below:
        return "semantic"
    return "structure" if share < refinement_from else "refinement"


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
    return [stage_of(h * w / reference_tokens, semantic_below, refinement_from) for h, w in scales]


def model_stages(cfg: InfinityConfig, scales: list[tuple[int, int]]) -> list[str]:
    """`stages` of any template's schedule, read on its square twin against the model's own reference grid."""
    return stages(*placement(cfg, scales))


def stagevar(scales: list[tuple[int, int]], depth: int, reference_tokens: int, rank: int = STAGEVAR_RANK,
             refinement_from: float = REFINEMENT_FROM) -> PruneSchedule:
    """prune=True's drops, skips, cache and layer window, plus StageVAR's refinement-stage accelerations:
    tokens chosen in a rank-`rank` random projection (`selector="projection"`) and guidance dropped
    from the first refinement scale on (`cfg_stop`; None when the schedule has no refinement scale)."""
    base = proportional(scales, depth, reference_tokens)
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


def placement(cfg: InfinityConfig, scales: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
    """What the presets and the stage split read a schedule on: its square twin and the model's square
    reference grid (tokens)."""
    return square_twin(scales), reference_tokens(cfg, 1.0)


def resolve_prune(prune, cfg: InfinityConfig, scales: list[tuple[int, int]]) -> PruneSchedule:
    """Accepts False/None (no pruning), True (the preset), "fastvar", "stagevar", a dict or a PruneSchedule.

    The result is not yet checked against the schedule: call `validate` (the pipeline does).
    """
    if prune is None or prune is False:
        return PruneSchedule.none()
    if isinstance(prune, PruneSchedule):
        return prune
    if prune is True or prune == "preset":
        twin, ref = placement(cfg, scales)
        return proportional(twin, cfg.depth, ref)
    if prune == "stagevar":
        twin, ref = placement(cfg, scales)
        return stagevar(twin, cfg.depth, ref)
    if prune == "fastvar":  # FastVAR's absolute window, cut to the layers the model has
        literal = fastvar_literal(scales)
        return replace(literal, layers=(literal.layers[0], min(literal.layers[1], cfg.depth - 1)))
    if isinstance(prune, dict):
        return schedule_from_dict(prune, cfg.depth)
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
