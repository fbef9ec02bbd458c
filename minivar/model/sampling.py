"""The scale loop: next-scale prediction of bits, from a 1x1 grid up to the final latent.

Before the first scale, `plan` decides every scale: whether it runs (pruning may skip the last ones),
how many tokens each layer computes, what the KV cache keeps, and where guidance runs. The loop, the
KV cache sizes, the memory estimate and the FLOP count all read that one plan. Then, for each scale
si with an h x w token grid:
  1. input     the running latent sum, resized to (h, w) and embedded (the 1x1 scale starts from the text)
  2. blocks    every layer runs on the scale's tokens; self-attention also sees the KV cache of all
               earlier scales; pruning (pruning.py) may compute only some tokens of some layers
  3. CFG       conditional and unconditional rows run as one doubled batch; their logits are mixed
               (from the CFG stop on, e.g. StageVAR's refinement stage, one branch runs alone: the
               conditional rows unless the schedule's cfg_stop_branch says otherwise)
  4. sample    one bit per (token, channel) from the tempered, top-p filtered logits
  5. codes     bits -> +-1/sqrt(d) codes, upsampled to the final grid and added to the running sum
The sum after the last scale is the latent the VAE decodes.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .config import InfinityConfig
from .pruning import BRANCHES, Pruner, PruneSchedule, ScaleRecord, model_stages
from .transformer import Attn, Conditioning, Infinity, KVCache
from .vae import add_scale_codes, bits_to_codes, bits_to_vae_layout, latent_to_tokens


@dataclass
class Settings:
    """Sampling settings, and the one source of their defaults (generate, sample and the CLI read them here).
    cfg and tau may be one value or one per scale."""
    cfg: float | list[float] = 3.0
    tau: float | list[float] = 0.5
    top_k: int = 900
    top_p: float = 0.97
    seed: int | None = 1
    cfg_insertion_layer: int = 0   # 0: mix logits; -k: mix hidden states after layer depth-k; 1: no mixing
    cfg_stop_scale: int | None = None  # from this scale on, run the conditional rows only (None: the prune schedule's)
    force_bits: list[torch.Tensor] | None = None  # teacher forcing: bits (B, h, w, d) of the first scales

    def per_scale(self, value, n: int) -> list[float]:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * n
        if len(values) < n:
            raise ValueError(f"got {len(values)} per-scale values for a schedule of {n} scales")
        return [float(v) for v in values]


@dataclass
class Trace:
    """Per-scale record of a generation (only scales that ran)."""
    scales: list[tuple[int, int]] = field(default_factory=list)
    index: list[int] = field(default_factory=list)          # position of each entry in the full schedule
    logits: list[torch.Tensor] = field(default_factory=list)  # (B, h*w, d, 2): after CFG and tau, as sampled
    bits: list[torch.Tensor] = field(default_factory=list)    # (B, h, w, d) int64
    codes: list[torch.Tensor] = field(default_factory=list)   # (B, d, h, w): this scale's residual codes
    summed: list[torch.Tensor] = field(default_factory=list)  # (B, d, H, W): running sum after this scale
    seconds: list[float] = field(default_factory=list)
    cfg_rows: list[int] = field(default_factory=list)         # batch rows the transformer ran at this scale
    kv_len: list[list[int]] = field(default_factory=list)     # per layer: cached tokens after this scale
    stage: list[str] = field(default_factory=list)            # "semantic", "structure" or "refinement" (pruning.stages)
    pruning: dict[int, ScaleRecord] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Sampling bits
# --------------------------------------------------------------------------------------------------
def sample_bits(logits: torch.Tensor, top_k: int, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Draw every bit from its two logits: (B, n, 2) -> (B, n) int64.

    A bit has only two values, so the usual filters shrink to one comparison each. top-k keeps both
    values for any k >= 2 (and k = 0 means no filter); k = 1 keeps only the likelier value. top-p
    keeps the less likely value only while its own probability exceeds 1 - top_p (top_p = 0 means no
    filter, upstream's convention; top_p = 1 removes only values of probability 0). A removed value
    gets probability 0, and the draw takes one number per bit from `gen` whatever was removed.
    """
    B, n, _ = logits.shape
    probs = logits.softmax(dim=-1)                                   # (B, n, 2)
    low, low_index = probs.min(dim=-1, keepdim=True)                 # the less likely value, (B, n, 1)
    remove = torch.full_like(low, top_k == 1, dtype=torch.bool)
    if top_p > 0:
        remove |= low <= 1 - top_p
    probs.scatter_(-1, low_index, low.masked_fill(remove, 0.0))
    return torch.multinomial(probs.view(-1, 2), num_samples=1, replacement=True, generator=gen).view(B, n)


def guide(x: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance on a doubled batch (B conditional rows, then B unconditional):
    cfg * cond + (1 - cfg) * uncond, (B, ...)."""
    cond, uncond = x.chunk(2)
    return cfg * cond + (1 - cfg) * uncond


# --------------------------------------------------------------------------------------------------
# The plan: every scale decided before the first one runs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleStep:
    """One scale of a generation, as planned."""
    si: int                  # index in the full schedule
    hw: tuple[int, int]      # token grid (h, w)
    runs: bool               # False: skipped by pruning, its residual is left out of the latent
    kept: tuple[int, ...]    # per layer: tokens computed (h * w unless pruned there)
    stored: bool             # its keys enter the KV cache (every scale that runs, except the last one)
    guided: bool             # the batch holds B conditional rows, then B unconditional ones
    mix_logits: bool         # the head runs on both halves and guidance mixes their logits; else on B rows
    cfg: float
    tau: float
    stage: str               # StageVAR's "semantic", "structure" or "refinement" (pruning.stages)


@dataclass(frozen=True)
class Plan:
    """The scale plan of one generation. The loop runs it, and the KV cache sizes, the memory estimate
    (pipeline.estimate) and the FLOP count (bench/flops.py) read it, so none of them re-derives the loop."""
    steps: tuple[ScaleStep, ...]
    ran: tuple[ScaleStep, ...]       # the steps that run, in order
    scales: list[tuple[int, int]]    # every step's grid
    template: float          # aspect template h/w: the RoPE grid every scale is placed on
    prune: PruneSchedule
    cfg_on: bool             # the text conditioning holds both halves (B conditional + B unconditional rows)
    kv_tokens: tuple[int, ...]  # per layer: the tokens its KV cache holds over the whole generation
    restored: tuple[int, ...]   # per layer: tokens of each sub-layer's output kept to restore from (the cache scale's)


def plan(cfg: InfinityConfig, scales: list[tuple[int, int]], template: float, s: Settings,
         prune: PruneSchedule) -> Plan:
    """Decide every scale: whether it runs, the tokens each layer computes, whether guidance runs.

    Guidance is on when any scale's cfg differs from 1; it stops (stage-aware CFG) from
    `cfg_stop_scale`, or the prune schedule's own `cfg_stop`, on. `prune` must fit `scales`
    (`pruning.resolve_prune` validates the schedules a caller gives).
    """
    n = len(scales)
    cfgs, taus = s.per_scale(s.cfg, n), s.per_scale(s.tau, n)
    cfg_on = any(c != 1 for c in cfgs)
    stop, ran, stages = prune.guidance_stop(s.cfg_stop_scale), prune.ran(n), model_stages(cfg, scales)
    guided = [cfg_on and (stop is None or si < stop) for si in range(n)]
    steps = tuple(ScaleStep(si, (h, w), si in ran, tuple(prune.kept(si, li, h * w) for li in range(cfg.depth)),
                            stored=si in ran[:-1], guided=guided[si],
                            mix_logits=guided[si] and cfgs[si] != 1 and s.cfg_insertion_layer == 0,
                            cfg=cfgs[si], tau=taus[si], stage=stages[si])
                  for si, (h, w) in enumerate(scales))
    kv_tokens = tuple(sum(s.kept[li] for s in steps if s.stored) for li in range(cfg.depth))
    c = prune.cache_scale  # `pruning.Pruner.runner`: the cache scale keeps its outputs inside the layer window
    restored = tuple(scales[c][0] * scales[c][1] if c is not None and prune.in_window(li) else 0
                     for li in range(cfg.depth))
    return Plan(steps, tuple(s for s in steps if s.runs), list(scales), template, prune, cfg_on, kv_tokens, restored)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def make_caches(model: Infinity, batch: int, p: Plan, device) -> list[KVCache]:
    """One preallocated cache per layer, sized by the plan, in `Infinity.kv_dtype` (bf16 when the
    weights or the compute are, float32 otherwise)."""
    dtype = model.kv_dtype
    return [KVCache(batch, model.cfg.num_heads, p.kv_tokens[li], model.cfg.head_dim, dtype, device)
            for li in range(model.cfg.depth)]


def run_blocks(model: Infinity, x: torch.Tensor, c: Conditioning, caches: list[KVCache], rope: torch.Tensor,
               pruner: Pruner, step: ScaleStep, last: bool, mix_after: int | None) -> torch.Tensor:
    """One scale through every block; x (rows, h*w, C). With `mix_after`, guidance mixes the hidden
    state after that layer, and both halves continue from the guided state."""
    x = model.embed_scale(x, step.si)  # level embedding, before the first block only
    for li, block in enumerate(model.blocks):
        x = block(x, c.gss, c.text, Attn(caches[li], rope, store=not last), pruner.runner(step.si, li))
        if li == mix_after and step.guided and step.cfg != 1:
            x = guide(x, step.cfg).repeat(2, 1, 1)
    return x


def stage_aware_cfg(x: torch.Tensor, c: Conditioning, caches: list[KVCache], pruner: Pruner, B: int,
                    branch: str) -> tuple[torch.Tensor, Conditioning, list[KVCache]]:
    """Where the plan stops guidance, keep one half of the batch ("conditional" or "unconditional").

    Every per-row state follows: the next scale's input x (at scale 0 each half has its own start
    token), the conditioning rows and text segments, the KV caches, and the pruner's restoration
    cache, whose rows must pair with the rows of the scales that it restores.
    """
    half = BRANCHES.index(branch)
    rows = slice(half * B, (half + 1) * B)
    pruner.keep_rows(rows)
    c = Conditioning(c.text.segment(half), c.cond[rows], c.gss[rows])
    return x[rows], c, [cache.rows(rows) for cache in caches]


def run_scale_loop(model: Infinity, c: Conditioning, B: int, p: Plan, s: Settings, trace: Trace | None = None,
                   progress: Callable[[list[int]], Iterable[int]] | None = None) -> torch.Tensor:
    """Generate the latent for B images by plan `p`. `c` holds 2B rows (cond, then uncond) when
    `p.cfg_on`, else B. `progress`, if given, wraps the list of the indices of the scales that run
    (e.g. `tqdm`) and must yield them in order.

    Returns summed codes (B, d_vae, 1, H, W) in the VAE's layout, ready for decoding.
    """
    patchify, device, ran = model.cfg.spatial_patchify, c.cond.device, p.ran
    if c.cond.shape[0] != (2 * B if p.cfg_on else B):
        raise ValueError(f"the conditioning has {c.cond.shape[0]} rows; the plan expects {2 * B if p.cfg_on else B}")
    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    pruner = Pruner(p.prune, p.scales, seed=s.seed or 0, record=trace is not None)
    caches = make_caches(model, c.cond.shape[0], p, device)
    mix_after = model.cfg.depth + s.cfg_insertion_layer if s.cfg_insertion_layer < 0 else None
    final = (1, *(2 * v for v in p.scales[-1])) if patchify else (1, *p.scales[-1])
    x_BLC, summed_Bd1HW, guided = model.first_tokens(c), None, p.cfg_on
    indices = [step.si for step in ran]
    for k, si in enumerate(progress(indices) if progress else indices):
        t0, step = time.perf_counter(), p.steps[si]
        if guided and not step.guided:  # the plan stops guidance here (the stop scale itself may be skipped)
            x_BLC, c, caches = stage_aware_cfg(x_BLC, c, caches, pruner, B, p.prune.cfg_stop_branch)
            guided = False
        rope = model.rope.table(p.template, *step.hw, device)
        last = k == len(ran) - 1
        x_BLC = run_blocks(model, x_BLC, c, caches, rope, pruner, step, last, mix_after)
        bits_Bhwd = sample_step(step_logits(model, x_BLC, c, step), s, k, gen, step.hw, trace)
        codes_Bd1hw = bits_to_codes(bits_to_vae_layout(bits_Bhwd, patchify))
        summed_Bd1HW = add_scale_codes(summed_Bd1HW, codes_Bd1hw, final, last=step.si == len(p.steps) - 1)
        if not last:  # the next scale's input: the running latent at its grid, embedded
            x_BLC = model.word_embed(latent_to_tokens(summed_Bd1HW, ran[k + 1].hw, patchify))
            x_BLC = x_BLC.repeat(2, 1, 1) if guided else x_BLC
        if trace is not None:
            record(trace, step, codes_Bd1hw, summed_Bd1HW, 2 * B if guided else B, time.perf_counter() - t0)
            trace.kv_len.append([cache.pos for cache in caches])
    if trace is not None:
        trace.pruning = pruner.records
    return summed_Bd1HW


def step_logits(model: Infinity, x: torch.Tensor, c: Conditioning, step: ScaleStep) -> torch.Tensor:
    """Bit logits (B, h*w*d, 2): temperature first, then guidance (upstream's order). Without guidance
    on the logits (CFG off, cfg = 1, or mixed inside the blocks) the conditional rows give them."""
    if step.mix_logits:
        logits = guide(model.logits(x, c.cond).mul(1 / step.tau), step.cfg)
    else:
        B = x.shape[0] // 2 if step.guided else x.shape[0]
        logits = model.logits(x[:B], c.cond[:B]).mul(1 / step.tau)
    return logits.reshape(logits.shape[0], -1, 2)


def sample_step(logits: torch.Tensor, s: Settings, step: int, gen: torch.Generator | None, hw: tuple[int, int],
                trace: Trace | None) -> torch.Tensor:
    """Sample (or take the forced) bits of the step-th scale that runs -> (B, h, w, d) int64.

    Forced scales are sampled too, so teacher forcing consumes the generator exactly as sampling does.
    """
    B = logits.shape[0]
    if trace is not None:
        trace.logits.append(logits.detach().float().reshape(B, hw[0] * hw[1], -1, 2).cpu().clone())
    bits = sample_bits(logits, s.top_k, s.top_p, gen).reshape(B, hw[0], hw[1], -1)
    forced = s.force_bits
    if forced is not None and step < len(forced) and forced[step] is not None:
        if tuple(forced[step].shape) != tuple(bits.shape):
            raise ValueError(f"force_bits[{step}] has shape {tuple(forced[step].shape)}, expected {tuple(bits.shape)}")
        bits = forced[step].to(bits.device, torch.int64)
    if trace is not None:
        trace.bits.append(bits.cpu())
    return bits


def record(trace: Trace, step: ScaleStep, codes: torch.Tensor, summed: torch.Tensor, rows: int, seconds: float) -> None:
    trace.scales.append(tuple(step.hw))
    trace.index.append(step.si)
    trace.stage.append(step.stage)
    trace.codes.append(codes.squeeze(2).float().cpu())
    trace.summed.append(summed.squeeze(2).float().cpu().clone())
    trace.cfg_rows.append(rows)
    trace.seconds.append(seconds)
