"""HART's AR transformer: VAR's next-scale transformer with Llama-style blocks and a text prefix.

Reading order: the two RoPE tables (`rope_1d` for the text, `rope_2d` for image tokens), `rotate`,
`HartAttention`, `SwiGLU`, `HartBlock`, `Head`, `Hart`. Shared with Infinity (../model/transformer.py):
the preallocated `KVCache`, `RMSNorm` and `Linear`; pruning (../model/pruning.py) enters through the
same `LayerRun.pick` / `fill` calls as in Infinity's blocks.

Every block runs two sub-layers on the residual stream x (R, L, C), with no AdaLN (hart-0.7b is built
with `disable_aln`):
    x = x + HartAttention(RMSNorm(x))        fused qkv with q and v biases; keys attend to the KV cache
    x = x + SwiGLU(RMSNorm(x))           gate, up and down projections without biases
The text enters only as the first "scale": `context_token` projected text states are run through the
blocks once, and their keys and values stay in the cache for every later scale. The head's AdaLN is
conditioned on the max over the projected text tokens.

Positions. The text tokens get the usual 1D RoPE of their position ids. An image token (i, j) of a
pn x pn scale gets the 2D position (i, j) * P / pn + (last text position), with P the final grid
(fractional for most scales). Its rotation table has head_dim / 4 frequencies (a stride-4 inverse
frequency) and is laid out [x, x, y, y], so the pairs (m, m + hd/2) that `rotate` turns mix an x angle
and a y angle: the first component turns by its x angle, the second by its y angle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.pruning import DENSE, LayerRun
from ..model.transformer import KVCache, Linear, RMSNorm
from .config import HartConfig


# --------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------
def inverse_frequencies(head_dim: int, stride: int, base: float) -> torch.Tensor:
    """base^(-k / head_dim) for k = 0, stride, 2 stride ... (head_dim / stride values)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, stride, dtype=torch.int64).float() / head_dim))


def rope_1d(pos: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Text positions pos (R, L) -> (2, R, 1, L, hd) cos and sin, laid out [f, f]."""
    freqs = pos.float()[..., None] * inverse_frequencies(head_dim, 2, base)   # (R, L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]                          # (R, 1, L, hd)
    return torch.stack([emb.cos(), emb.sin()])


def image_positions(pn: int, last: int, offset: torch.Tensor) -> torch.Tensor:
    """2D positions (R, pn*pn, 2) of a pn x pn scale on the final `last` x `last` grid, shifted by each
    row's last text position `offset` (R,) (0 for the unconditional rows)."""
    a = torch.arange(pn)
    grid = torch.stack(torch.meshgrid(a, a, indexing="ij"), dim=-1).reshape(-1, 2) / pn * last  # (L, 2)
    return grid[None] + offset[:, None, None]


def rope_2d(pos: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Image positions pos (R, L, 2) -> (2, R, 1, L, hd) cos and sin, laid out [x, x, y, y]."""
    inv = inverse_frequencies(head_dim, 4, base)                              # (hd/4,)
    fx, fy = pos[..., 0, None].float() * inv, pos[..., 1, None].float() * inv  # 2 x (R, L, hd/4)
    emb = torch.cat([fx, fx, fy, fy], dim=-1)[:, None]                        # (R, 1, L, hd)
    return torch.stack([emb.cos(), emb.sin()])


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x (R, H, L, hd): x * cos + (-x2, x1) * sin, with x1, x2 the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * rope[0] + torch.cat([-x2, x1], dim=-1) * rope[1]


# --------------------------------------------------------------------------------------------------
# Sub-layers
# --------------------------------------------------------------------------------------------------
@dataclass
class HartAttn:
    """What attention needs at one scale in one layer."""
    cache: KVCache
    rope: torch.Tensor       # (2, R, 1, L, hd) for the scale's tokens
    store: bool = True       # False at the last scale: nothing attends to its keys later


class HartAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = 0.25 / self.head_dim ** 0.5  # VAR's attention temperature, a quarter of the usual
        self.qkv_proj = Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))  # keys have no bias; kept for the checkpoint
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn: HartAttn, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (R, L, C) -> (R, L, C). `keep` (R, L) holds the grid index of each row when x is a pruned subset."""
        R, L, C = x.shape
        qkv = self.qkv_proj(x, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        q, k, v = qkv.view(R, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (R, H, L, hd)
        rope = attn.rope
        if keep is not None:  # each kept token keeps the angles of its own grid position
            rope = rope.gather(3, keep[None, :, None, :, None].expand(2, -1, 1, -1, rope.shape[-1]))
        k, v = attn.cache.extend(rotate(k, rope), v, attn.store)
        # No mask: a scale sees the text and all earlier scales, and its own tokens each other. (FastVAR's
        # HART spells attention out as softmax(q k^T * scale) v; on the fixtures SDPA gives the same tokens.)
        out = F.scaled_dot_product_attention(rotate(q, rope), k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(R, L, C))  # (R, H, L, hd) -> (R, L, C)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HartBlock(nn.Module):
    def __init__(self, cfg: HartConfig):
        super().__init__()
        self.ln_wo_grad = RMSNorm(cfg.embed_dim, cfg.norm_eps)  # one norm, used before both sub-layers
        self.attn = HartAttention(cfg.embed_dim, cfg.num_heads)
        self.ffn = SwiGLU(cfg.embed_dim, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, attn: HartAttn, prune: LayerRun = DENSE) -> torch.Tensor:
        """x (R, L, C) -> (R, L, C); `prune` picks the tokens each sub-layer computes and fills the rest."""
        keep, t = prune.pick(x, "sa")
        x = x + prune.fill(self.attn(self.ln_wo_grad(t), attn, keep), keep, "sa")
        keep, t = prune.pick(x, "ffn")
        return x + prune.fill(self.ffn(self.ln_wo_grad(t)), keep, "ffn")


class Head(nn.Module):
    """AdaLN before the classifier, conditioned on the max over the projected text tokens."""

    def __init__(self, C: int, eps: float):
        super().__init__()
        self.ln_wo_grad = RMSNorm(C, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(C, 2 * C))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x (R, L, C), text (R, N, C) -> (R, L, C)."""
        cond = text.max(dim=1, keepdim=True).values                                  # (R, 1, C)
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)      # 2 x (R, 1, C)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class Hart(nn.Module):
    def __init__(self, cfg: HartConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.context_norm = RMSNorm(cfg.context_dim, cfg.norm_eps) if cfg.use_context_norm else nn.Identity()
        self.context_embed = Linear(cfg.context_dim, C)
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        self.word_embed = Linear(cfg.d_vae, C)
        self.blocks = nn.ModuleList(HartBlock(cfg) for _ in range(cfg.depth))
        self.head_nm = Head(C, cfg.norm_eps)
        self.head = Linear(C, cfg.vocab_size)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Text states (R, N, Dc) -> projected tokens (R, N, C): the first scale's input and the head's condition."""
        return self.context_embed(self.context_norm(context))

    def embed_scale(self, x: torch.Tensor, si: int) -> torch.Tensor:
        """Add scale si's level embedding to its tokens x (R, L, C) (the text prefix is level 0)."""
        return x + self.lvl_embed.weight[si]

    def logits(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x (R, L, C) -> codebook logits (R, L, V), float32."""
        return self.head(self.head_nm(x.float(), text)).float()
