"""Pruning presets: turn `prune=True | "fastvar" | dict | PruneSchedule` into a `PruneSchedule`.

`prune="fastvar"` is FastVAR's released recipe taken literally, whatever the model: absolute layers
3..27, scales 32 and 40 wide drop 40 % and 50 % of their tokens, the 576-token (24x24) scale is the
restoration cache, and scales 48 or 64 wide are skipped. It only makes sense for 1:1 schedules; it
is what parity with FastVAR's code is checked against.

`prune=True` is the same recipe expressed so that it transfers to every model, aspect and budget.
Each scale is placed by its token count relative to the model's reference grid (the template's
final grid at the model's native resolution, 64x64 for 1:1 at 1024 on Infinity), and the layer
window is scaled with depth:

    share r = tokens / reference tokens     1:1 at 1024 (Infinity-2B)
    largest scale with r < 0.20             24x24 (r 0.14)      restoration cache
    0.20 <= r < 0.32                        32x32 (r 0.25)      drop 40 %
    0.32 <= r < 0.47                        40x40 (r 0.39)      drop 50 %
    r >= 0.47                               48x48, 64x64        skipped
    layers round(3/32 depth) .. round(27/32 depth)              3 .. 27 of 32

On Infinity-2B at 1:1 and 1024 this reproduces FastVAR exactly; on 2:1 it picks 38x19 as the cache,
46x23 and 60x30 as pruned scales and skips 74x37 and 90x45, the same positions in the schedule.
Lower budgets prune only the scales that reach these shares (none at 256). Zero-shot high resolution
(1344, 2048) keeps every scale, since skipping would throw away exactly what the extra scales add:
scales with r >= 0.47 are computed on 25 % of their tokens instead.
"""
from __future__ import annotations

from dataclasses import fields

from .config import TEMPLATES, InfinityConfig
from .pruning import PruneSchedule

CACHE_BELOW, DROP40_BELOW, DROP50_BELOW = 0.20, 0.32, 0.47
HIGH_RES_DROP = 0.75
FASTVAR_LAYERS, FASTVAR_DEPTH = (3, 27), 32
# The grid area each model was trained to fill (its "1M" grid), in tokens per 1:1 image side.
REFERENCE_SIDE = {"infinity-2b": 64, "infinity-8b": 64, "toy": 16}


def fastvar_literal(scales: list[tuple[int, int]]) -> PruneSchedule:
    """FastVAR's recipe exactly as released: triggers are literal widths and a literal token count."""
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
    layers = tuple(round(x / FASTVAR_DEPTH * depth) for x in FASTVAR_LAYERS)
    return PruneSchedule(drop=drop, skip=frozenset(skip), layers=layers, cache_scale=cached[-1])


def reference_tokens(model: str, template: float) -> int:
    """Tokens of the model's native final grid for this aspect template: the template's 1M grid,
    scaled to the model's native side (64 cells for Infinity, less for the toy)."""
    h, w = TEMPLATES[template][-1]
    side = REFERENCE_SIDE.get(model, 64)
    return round(h * w * (side / 64) ** 2)


def resolve_prune(prune, model: str, cfg: InfinityConfig, scales: list[tuple[int, int]],
                  template: float = 1.0) -> PruneSchedule:
    """Accepts False/None (no pruning), True (the preset), "fastvar", a dict or a PruneSchedule."""
    if prune is None or prune is False:
        return PruneSchedule.none()
    if isinstance(prune, PruneSchedule):
        return prune
    if prune is True or prune == "preset":
        return proportional(scales, cfg.depth, reference_tokens(model, template))
    if prune == "fastvar":
        return fastvar_literal(scales)
    if isinstance(prune, dict):
        names = {f.name for f in fields(PruneSchedule)}
        unknown = set(prune) - names
        if unknown:
            raise ValueError(f"unknown prune schedule fields {sorted(unknown)}; expected {sorted(names)}")
        kw = dict(prune)
        kw["drop"] = {int(k): float(v) for k, v in kw.get("drop", {}).items()}
        kw["skip"] = frozenset(int(s) for s in kw.get("skip", ()))
        kw["layers"] = tuple(kw.get("layers", (0, cfg.depth - 1)))
        return PruneSchedule(**kw)
    raise ValueError(f"prune={prune!r} is not understood: use False, True, 'fastvar', a dict or a PruneSchedule")
