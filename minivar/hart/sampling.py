"""HART's scale loop, discrete path: text prefix, then codebook tokens from 1x1 up to the final grid.

For each scale si of the schedule (pn x pn tokens; scale 0 is the text prefix and yields one token):
  1. input     scale 0: the projected text; later scales: the running latent f_hat, area-resized to
               (pn, pn), embedded, plus the scale's level embedding
  2. blocks    every layer runs on the scale's tokens and the KV cache of all earlier ones; pruning
               (../model/pruning.py, FastVAR) may compute only some tokens of some layers
  3. CFG       conditional and unconditional rows (text zeroed) run as one doubled batch; guidance
               grows linearly with the scale: t = cfg * si / (n - 1), logits (1 + t) cond - t uncond
  4. sample    one codebook index per token, top-k (600 below the 8th scale, 300 from it on)
  5. latent    codebook vectors added to f_hat (vq.py, `Quantizer.add_scale`)
The image is the decoded f_hat. Step 2 of the port adds HART's continuous last residual (a diffusion
MLP on top of the last scale) and the Qwen2 text encoder; here the text states are an input.

Upstream's quirks, kept: the last scale reuses the previous scale's guidance ratio (n - 2) / (n - 1)
(it runs after the loop in a MaskGIT-style block, with one iteration); at scale 0 only the last text
token's logits are sampled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model.pruning import Pruner, PruneSchedule
from ..model.transformer import KVCache
from .transformer import HartAttn, Hart, image_positions, rope_1d, rope_2d
from .vq import HartVQ


@dataclass
class HartTrace:
    """Per scale: the guided logits as sampled (B, l, V), the tokens (B, l) and f_hat after the scale."""
    logits: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    f_hat: list[torch.Tensor] = field(default_factory=list)


def top_k_for(si: int) -> int:
    """Upstream's sampler keeps the 600 likeliest codes at the first 7 scales and 300 after (whatever top_k says)."""
    return 600 if si < 7 else 300


def sample_tokens(logits: torch.Tensor, top_k: int, gen: torch.Generator | None) -> torch.Tensor:
    """One index per token from the top-k filtered logits (B, l, V) -> (B, l), one draw per token from `gen`."""
    B, l, V = logits.shape
    kth = logits.topk(min(top_k, V), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    probs = logits.masked_fill(logits < kth, -torch.inf).softmax(dim=-1)
    return torch.multinomial(probs.view(-1, V), num_samples=1, replacement=True, generator=gen).view(B, l)


def fastvar_hart(depth: int, patch_nums: tuple[int, ...]) -> PruneSchedule:
    """FastVAR's recipe for HART as released: in every layer, the 48x48 scale computes 50 % of its tokens
    and the 64x64 scale 25 %, the others restored from the 36x36 scale's outputs; no scale is skipped."""
    drop = {si: {48: 0.5, 64: 0.75}[pn] for si, pn in enumerate(patch_nums) if pn in (48, 64)}
    cache = next((si for si, pn in enumerate(patch_nums) if pn == 36), None)
    if drop and cache is None:
        raise ValueError("prune='fastvar' needs a 36x36 scale before 48x48 and 64x64 (HART's 1024 schedule)")
    return PruneSchedule(drop=drop, layers=(0, depth - 1), cache_scale=cache) if drop else PruneSchedule.none()


def make_hart_caches(model: Hart, rows: int, prune: PruneSchedule, device: torch.device) -> list[KVCache]:
    """One cache per layer, sized for the text prefix and every scale but the last (never attended to)."""
    cfg = model.cfg
    kept = [[prune.kept(si, li, pn * pn) for si, pn in enumerate(cfg.patch_nums[:-1]) if si > 0]
            for li in range(cfg.depth)]
    return [KVCache(rows, cfg.num_heads, cfg.context_token + sum(kept[li]), cfg.head_dim, torch.float32, device)
            for li in range(cfg.depth)]


def generate(model: Hart, vq: HartVQ, context: torch.Tensor, context_position_ids: torch.Tensor, cfg: float = 4.5,
             seed: int | None = 1, prune: PruneSchedule | None = None, force_tokens: list[torch.Tensor] | None = None,
             trace: HartTrace | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from text states `context` (B, N, Dc) and their position ids (B, N).

    `force_tokens[si]` (B, l), when given, replaces scale si's draw (teacher forcing); the generator is
    consumed exactly as when sampling.
    """
    check_inputs(model, context, context_position_ids, cfg, seed, force_tokens)
    prune = prune or PruneSchedule.none()
    pns, n, B = model.cfg.patch_nums, len(model.cfg.patch_nums), context.shape[0]
    gen = torch.Generator(context.device).manual_seed(seed) if seed is not None else None
    text = model.embed_text(torch.cat([context, torch.zeros_like(context)]))   # (2B, N, C): cond, then uncond
    offsets = torch.cat([context_position_ids[:, -1], torch.zeros_like(context_position_ids[:, -1])])  # (2B,)
    pruner, caches = Pruner(prune, [(pn, pn) for pn in pns]), make_hart_caches(model, 2 * B, prune, context.device)
    f_hat = text.new_zeros(B, model.cfg.d_vae, pns[-1], pns[-1])
    x = model.embed_scale(text, 0)
    for si, pn in enumerate(pns):
        if si == 0:
            rope = rope_1d(torch.cat([context_position_ids, torch.zeros_like(context_position_ids)]),
                           model.cfg.head_dim, model.cfg.rope_theta)
        else:
            rope = rope_2d(image_positions(pn, pns[-1], offsets), model.cfg.head_dim, model.cfg.rope_theta)
        for li, block in enumerate(model.blocks):
            x = block(x, HartAttn(caches[li], rope, store=si < n - 1), pruner.runner(si, li))
        t = cfg * min(si, n - 2) / (n - 1)  # the last scale keeps the previous ratio (upstream)
        logits = model.logits(x[:, -1:] if si == 0 else x, text)
        logits = (1 + t) * logits[:B] - t * logits[B:]                          # (B, l, V)
        tokens = sample_tokens(logits, top_k_for(si), gen)
        if force_tokens is not None and si < len(force_tokens):
            tokens = force_tokens[si].to(tokens)
        h = vq.quantize.embedding(tokens).transpose(1, 2).reshape(B, -1, pn, pn)  # (B, Cvae, pn, pn)
        f_hat = vq.quantize.add_scale(f_hat, h, si, n)
        if trace is not None:
            trace.logits.append(logits)
            trace.tokens.append(tokens)
            trace.f_hat.append(f_hat.clone())
        if si < n - 1:  # the next scale's input: f_hat at its grid, embedded, for both halves
            nxt = torch.nn.functional.interpolate(f_hat, size=(pns[si + 1],) * 2, mode="area")
            x = model.embed_scale(model.word_embed(nxt.flatten(2).transpose(1, 2)), si + 1).repeat(2, 1, 1)
    return vq.decode(f_hat)


def check_inputs(model: Hart, context: torch.Tensor, pos: torch.Tensor, cfg: float, seed: int | None,
                 force_tokens: list[torch.Tensor] | None) -> None:
    """One ValueError line, before any work, for inputs that do not fit the model."""
    c = model.cfg
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or tuple(context.shape[1:]) != (c.context_token, c.context_dim):
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"context must be text states (B, {c.context_token}, {c.context_dim}), got {got}")
    if not isinstance(pos, torch.Tensor) or tuple(pos.shape) != tuple(context.shape[:2]) or pos.is_floating_point():
        got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"context_position_ids must be integer positions {tuple(context.shape[:2])}, got {got}")
    if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not math.isfinite(cfg):
        raise ValueError(f"cfg={cfg!r} is invalid: use a finite number (HART's default is 4.5)")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
        raise ValueError(f"seed={seed!r} is invalid: use None or a whole number 0 ... 2**64-1")
    for si, tokens in enumerate(force_tokens or []):
        want = (context.shape[0], 1 if si == 0 else c.patch_nums[si] ** 2)
        if si >= len(c.patch_nums) or tuple(tokens.shape) != want or tokens.is_floating_point():
            raise ValueError(f"force_tokens[{si}] must be integer codes of shape {want} (scale {si} of "
                             f"{len(c.patch_nums)}), got {tuple(tokens.shape)}")
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < c.vocab_size:
            raise ValueError(f"force_tokens[{si}] holds codes outside 0 ... {c.vocab_size - 1}")
