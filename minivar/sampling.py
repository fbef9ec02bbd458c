"""The scale loop: next-scale prediction of bits, from a 1x1 grid up to the final latent.

For each scale si with an h x w token grid:
  1. input     the running latent sum, resized to (h, w) and embedded (the 1x1 scale starts from the text)
  2. blocks    every layer runs on the scale's tokens; self-attention also sees the KV cache of all
               earlier scales; pruning (pruning.py) may compute only some tokens of some layers
  3. CFG       conditional and unconditional rows run as one doubled batch; their logits are mixed
  4. sample    one bit per (token, channel) from the tempered, top-p filtered logits
  5. codes     bits -> +-1/sqrt(d) codes, upsampled to the final grid and added to the running sum
The sum after the last scale is the latent the VAE decodes.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .bsq import bits_to_codes
from .numerics import cache_dtype
from .pruning import Pruner, PruneSchedule, ScaleRecord
from .transformer import Attn, Conditioning, Infinity, KVCache


@dataclass
class Settings:
    """Sampling settings. cfg and tau may be one value or one per scale."""
    cfg: float | list[float] = 3.0
    tau: float | list[float] = 0.5
    top_k: int = 900
    top_p: float = 0.97
    seed: int | None = 1
    cfg_insertion_layer: int = 0   # 0: mix logits; -k: mix hidden states after layer depth-k; 1: no mixing
    cfg_stop_scale: int | None = None  # from this scale on, run the conditional rows only
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
    pruning: dict[int, ScaleRecord] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Sampling bits
# --------------------------------------------------------------------------------------------------
def sample_bits(logits: torch.Tensor, top_k: int, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Draw every bit from its two logits: (B, n, 2) -> (B, n) int64.

    A bit has only two values, so the usual filters shrink to one comparison each. top-k keeps both
    values for any k >= 2 (and k = 0 means no filter); k = 1 keeps only the likelier value. top-p
    keeps the less likely value only while its own probability exceeds 1 - top_p. A removed value
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


def guide(x: torch.Tensor, cfg: float, B: int) -> torch.Tensor:
    """Classifier-free guidance on a doubled batch: cfg * cond + (1 - cfg) * uncond."""
    return cfg * x[:B] + (1 - cfg) * x[B:]


# --------------------------------------------------------------------------------------------------
# Bits <-> transformer tokens
# --------------------------------------------------------------------------------------------------
def bits_to_vae_layout(bits_Bhwd: torch.Tensor, patchify: bool) -> torch.Tensor:
    """Transformer bits (B, h, w, d) -> VAE bits (B, 1, h', w', d'); 2x2 unpatchify for Infinity-8B."""
    if patchify:
        bits_Bhwd = F.pixel_shuffle(bits_Bhwd.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # (B, 2h, 2w, d/4)
    return bits_Bhwd.unsqueeze(1)


def latent_to_tokens(summed_Bd1HW: torch.Tensor, hw: tuple[int, int], patchify: bool) -> torch.Tensor:
    """The running latent sum resized to the next grid, as transformer inputs (B, h*w, d)."""
    h, w = (2 * hw[0], 2 * hw[1]) if patchify else hw
    x = F.interpolate(summed_Bd1HW, size=(1, h, w), mode="trilinear").squeeze(-3)  # (B, d, h, w)
    if patchify:
        x = F.pixel_unshuffle(x, 2)  # (B, 4d, h/2, w/2)
    return x.reshape(*x.shape[:2], -1).permute(0, 2, 1)  # (B, h*w, d)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def make_caches(model: Infinity, batch: int, scales, prune: PruneSchedule, device) -> list[KVCache]:
    """One preallocated cache per layer, sized for the tokens that later scales attend to, in the
    weights' dtype (numerics.cache_dtype: bf16 for published checkpoints, float32 for float32 weights)."""
    ran = prune.ran(len(scales))
    stored = ran[:-1]  # nothing attends to the last scale that runs
    sizes = [sum(prune.kept(si, li, scales[si][0] * scales[si][1]) for si in stored) for li in range(model.cfg.depth)]
    dtype = cache_dtype(model.storage_dtype)
    return [KVCache(batch, model.cfg.num_heads, n, model.cfg.head_dim, dtype, device) for n in sizes]


def run_blocks(model: Infinity, x: torch.Tensor, c: Conditioning, caches, rope, si: int, store: bool,
               pruner: Pruner, cfg: float, B: int, insert_at: int | None) -> torch.Tensor:
    """One scale through every block; x (rows, h*w, C). Guidance may mix the hidden state mid-way."""
    x = model.embed_scale(x, si)  # level embedding, before the first block only
    for li, block in enumerate(model.blocks):
        x = block(x, c.gss, c.text, Attn(caches[li], rope, store), pruner.runner(si, li))
        if li == insert_at and cfg != 1 and x.shape[0] > B:
            x = guide(x, cfg, B).repeat(2, 1, 1)  # both halves continue from the guided state
    return x


def conditional_only(c: Conditioning, caches: list[KVCache], pruner: Pruner,
                     B: int) -> tuple[Conditioning, list[KVCache]]:
    """The conditional rows of a CFG batch (stage-aware CFG drops the unconditional half).

    Every per-row state follows: the KV caches, and the pruner's restoration cache, whose rows must
    pair with the rows of the scales that it restores.
    """
    pruner.keep_rows(B)
    return Conditioning(c.text, c.cond[:B], c.gss[:B]), [cache.rows(B) for cache in caches]


def accumulate(summed: torch.Tensor | None, codes: torch.Tensor, final_hw, is_last: bool) -> torch.Tensor:
    """Add a scale's codes (B, d, 1, h, w) to the running latent at the final grid (B, d, 1, H, W)."""
    if not is_last:
        codes = F.interpolate(codes, size=(1, *final_hw), mode="trilinear")
    return codes if summed is None else summed.add_(codes)


def run_scale_loop(model: Infinity, c: Conditioning, B: int, scales: list[tuple[int, int]], template: float,
                   s: Settings, prune: PruneSchedule, trace: Trace | None = None,
                   progress: Callable[[list[int]], Iterable[int]] | None = None) -> torch.Tensor:
    """Generate the latent for B images. `c` holds 2B rows (cond, then uncond) when CFG is on.

    `progress`, if given, wraps the list of scales that run (e.g. `tqdm`) and must yield them in order.

    Returns summed codes (B, d_vae, 1, H, W) in the VAE's layout, ready for decoding.
    """
    n, patchify, device = len(scales), model.cfg.spatial_patchify, c.cond.device
    cfgs, taus = s.per_scale(s.cfg, n), s.per_scale(s.tau, n)
    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    prune.validate(n, model.cfg.depth)
    pruner = Pruner(prune, scales, seed=s.seed or 0, record=trace is not None)
    ran = [si for si in range(n) if pruner.runs(si)]
    caches = make_caches(model, c.cond.shape[0], scales, prune, device)
    insert_at = model.cfg.depth + s.cfg_insertion_layer if s.cfg_insertion_layer < 0 else None
    final_hw = tuple(2 * v for v in scales[-1]) if patchify else scales[-1]
    x, summed = model.first_tokens(c), None
    for step, si in enumerate(progress(ran) if progress else ran):
        t0 = time.perf_counter()
        if s.cfg_stop_scale is not None and si >= s.cfg_stop_scale and x.shape[0] > B:
            # stage-aware CFG: conditional rows only from here (">=": the stop scale may be skipped)
            (c, caches), x = conditional_only(c, caches, pruner, B), x[:B]
        rope = model.rope.table(template, *scales[si], device)
        x = run_blocks(model, x, c, caches, rope, si, si != ran[-1], pruner, cfgs[si], B, insert_at)
        logits = step_logits(model, x, c, cfgs[si], taus[si], B, s.cfg_insertion_layer)
        bits = sample_step(logits, s, step, gen, scales[si], trace)
        codes = bits_to_codes(bits_to_vae_layout(bits, patchify))  # (B, d, 1, h, w)
        summed = accumulate(summed, codes, final_hw, is_last=si == n - 1)
        if si != ran[-1]:  # the next scale's input: the running latent at its grid, embedded
            nxt = ran[step + 1]
            x = model.word_embed(latent_to_tokens(summed, scales[nxt], patchify)).repeat(x.shape[0] // B, 1, 1)
        if trace is not None:
            record(trace, si, scales[si], codes, summed, x.shape[0], time.perf_counter() - t0)
            trace.kv_len.append([cache.pos for cache in caches])
    if trace is not None:
        trace.pruning = pruner.records
    return summed


def step_logits(model, x, c: Conditioning, cfg: float, tau: float, B: int, insertion: int):
    """Bit logits (B, h*w*d, 2): temperature first, then guidance (upstream's order)."""
    if x.shape[0] > B and cfg != 1 and insertion == 0:
        logits = model.logits(x, c.cond).mul(1 / tau)
        logits = guide(logits, cfg, B)
    else:
        logits = model.logits(x[:B], c.cond[:B]).mul(1 / tau)
    return logits.reshape(B, -1, 2)


def sample_step(logits, s: Settings, step: int, gen, hw, trace: Trace | None) -> torch.Tensor:
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


def record(trace: Trace, si: int, hw, codes, summed, rows: int, seconds: float) -> None:
    trace.scales.append(tuple(hw))
    trace.index.append(si)
    trace.codes.append(codes.squeeze(2).float().cpu())
    trace.summed.append(summed.squeeze(2).float().cpu().clone())
    trace.cfg_rows.append(rows)
    trace.seconds.append(seconds)
