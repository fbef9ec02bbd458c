"""The Infinity transformer: text conditioning, blocks with self- and cross-attention, and the bit head.

Reading order: `Rope2D`, `KVCache`, the three sub-layers (`SelfAttention`, `CrossAttention`, `FFN`),
`Block`, then `Infinity`. It is plain PyTorch: nn.Linear, nn.LayerNorm and torch's scaled dot-product
attention, with norms in float32. It uses config.py (sizes, the RoPE grid) and pruning.py (`LayerRun`,
which `Block` asks which tokens each sub-layer computes). The scale loop that drives the model lives
in sampling.py; this file only knows how to run one scale through the blocks.

Loading (loading/checkpoint.py) puts every model it loads in parity mode (../parity.py): the
bf16-storage, batch-invariance and bf16 cross-attention numerics that make CPU results equal
upstream's bit for bit, swapped in as module subclasses at load time and never branched on here.

Every Infinity block runs three sub-layers on the residual stream x (B, L, C):
    x = x + SA(AdaLN(x)) * gamma1          self-attention over all tokens of earlier scales (KV cache)
    x = x + CA(LN(x))                      cross-attention to the T5 text tokens
    x = x + FFN(AdaLN(x)) * gamma2
The AdaLN modulation comes from the pooled text: one shared Linear gives 6 vectors per image and each
block adds its own learned offset `ada_gss`. At a pruned scale each sub-layer computes only the tokens
that pruning picks, and pruning fills in the rest (`Block.forward`).

Parameter names follow the public checkpoints so that they load without a translation table, apart
from the grouping of blocks (`block_chunks.{c}.module.{i}` upstream, `blocks.{n}` here; checkpoint.py).
"""
from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import InfinityConfig, rope_grid_for
from .pruning import DENSE, LayerRun


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then the AdaLN modulation x * (1 + scale) + shift, in float32."""
    x = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    return x.mul(scale.add(1)).add_(shift)


class RMSNorm(nn.Module):
    """Root-mean-square norm in fp32, weight applied in fp32. (t5.py's differs on purpose: Hugging Face's
    T5 casts back to the weight's dtype before applying the weight, and its numbers follow that.)"""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """F.linear with input, weight and bias all in `dtype`: a bf16-stored weight is read in place (bf16
    compute) or upcast for this one product (fp32 compute); no full-precision copy of the model is kept."""
    return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


class Linear(nn.Linear):
    """nn.Linear that computes in `compute_dtype` whatever dtype its weights are stored in; the output is
    in `compute_dtype`. `Infinity.set_compute_dtype` sets it on every layer (float32 until then).
    The split-bias products (qkv, text kv) pass the bias they assemble from several parameters."""
    compute_dtype = torch.float32

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias if bias is None else bias, self.compute_dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the dtype of its input and stored parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


# --------------------------------------------------------------------------------------------------
# 2D rotary position embedding
# --------------------------------------------------------------------------------------------------
class Rope2D:
    """2D RoPE with positions normalised to the template's 1M grid (upstream `rope2d_normalized_by_hw=2`).

    The first half of each head's rotation pairs encodes the row, the second half the column. A token
    (i, j) of an h x w scale gets row position round(i * H1M / h) and column round(j * W1M / w), so every
    scale of a template samples the same underlying 128 x 128 angle grid.
    """

    def __init__(self, head_dim: int, max_grid: int = 128, base: float = 10000.0):
        half, cpu = head_dim // 2, torch.device("cpu")  # explicit device: models are built under "meta"
        inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64, device=cpu).float() / half))
        angles = torch.outer(torch.arange(max_grid, device=cpu).float(), inv_freq)  # (G, hd/4): position x frequency
        # Row and column use the same angles: token (i, j) rotates its first quarter-pairs by row i's
        # angles and the rest by column j's.
        grid = torch.cat([angles[:, None, :].expand(-1, max_grid, -1),
                          angles[None, :, :].expand(max_grid, -1, -1)], dim=-1)  # (G, G, hd/2)
        self.cos_sin = torch.stack([grid.cos(), grid.sin()])  # (2, G, G, hd/2)
        self._cache: dict[tuple, torch.Tensor] = {}

    def table(self, template: float, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(2, h*w, hd/2) cos and sin for every token of an h x w scale, row-major."""
        key = (template, h, w, str(device))
        if key not in self._cache:
            H, W = rope_grid_for(template)
            rows = (torch.arange(h, device="cpu") * (H / h)).round().int()
            cols = (torch.arange(w, device="cpu") * (W / w)).round().int()
            ii, jj = rows[:, None].expand(h, w).reshape(-1), cols[None, :].expand(h, w).reshape(-1)
            self._cache[key] = self.cos_sin[:, ii, jj, :].to(device)
        return self._cache[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2m, 2m+1) of x (B, H, L, hd) by angles given as cos, sin broadcastable to (B, H, L, hd/2).

    Written as x * (c, c) + (x1, x0) * (-s, s): every element is rounded exactly as in the textbook
    (c x0 - s x1, s x0 + c x1), with half the passes over x and no stack of the two halves.
    """
    cos2 = torch.stack([cos, cos], dim=-1).flatten(-2)       # (..., L, hd): c0 c0 c1 c1 ...
    sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)      # -s0 s0 -s1 s1 ...
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (B, H, L, hd): x1 x0 x3 x2 ...
    return (x * cos2).add_(swapped * sin2)


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys and values of one layer, written in place at a position pointer.

    Its capacity is the number of tokens that later scales attend to (the final scale is never
    stored). The scale that is not stored still needs the cached keys and its own in one attention
    call; `extend(..., store=False)` joins them in a temporary that is freed after the layer.
    """

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch, heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.pos = 0

    def rows(self, rows: slice) -> KVCache:
        """A view of some batch rows (stage-aware CFG keeps one half of a guided batch)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.pos = self.k[rows], self.v[rows], self.pos
        return view

    def extend(self, k: torch.Tensor, v: torch.Tensor, store: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H, L, hd); return all keys and values so far, (B, H, pos + L, hd)."""
        n = k.shape[2]
        if not store:
            return (torch.cat([self.k[:, :, : self.pos], k], dim=2),
                    torch.cat([self.v[:, :, : self.pos], v], dim=2))
        if self.pos + n > self.k.shape[2]:
            raise RuntimeError(f"KV cache overflow: {self.pos} + {n} > capacity {self.k.shape[2]}")
        self.k[:, :, self.pos : self.pos + n] = k
        self.v[:, :, self.pos : self.pos + n] = v
        self.pos += n
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def cache_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The KV cache stores keys and values like the weights: bf16 (fp16) with half-precision weights,
    float32 otherwise. It is the largest buffer of a generation after the weights (6.3 GiB in float32
    for Infinity-2B at 1024x1024 unpruned), and attention reads it back in the queries' dtype. With bf16
    weights, rounding the cached keys and values to bf16 moves sampled bits about as much as rounding
    the weights does (README, "Running Infinity-2B on a laptop")."""
    return weight_dtype if weight_dtype in (torch.bfloat16, torch.float16) else torch.float32


# --------------------------------------------------------------------------------------------------
# Sub-layers
# --------------------------------------------------------------------------------------------------
@dataclass
class Attn:
    """What self-attention needs at one scale in one layer: the layer's cache and the RoPE angles."""
    cache: KVCache | None
    rope: torch.Tensor      # (2, L, hd/2) for the scale's tokens in grid order
    store: bool = True      # False at the last scale: nothing attends to its keys later
    mask: torch.Tensor | None = None  # (L, L) bool, for whole-sequence forwards without a cache


# Opt-in probes of self-attention (analysis.capture_attention): module -> fn(q, k). A context variable,
# so a probe set by one thread (or task) never sees another's generation.
ATTENTION_PROBES: ContextVar[dict[nn.Module, Callable[[torch.Tensor, torch.Tensor], None]] | None] = \
    ContextVar("attention_probes", default=None)
MAX_LOG_SCALE = float(np.float32(math.log(100.0)))  # log(100) rounded to float32, as upstream clamps (no kernel at import)


class SelfAttention(nn.Module):
    """Cosine self-attention: q and k are L2-normalised per head; q carries a learned, clamped scale."""
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.mat_qkv = Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))  # keys have no bias; kept for the checkpoint
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.max_log_scale = MAX_LOG_SCALE
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn: Attn, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C). `keep` (B, L) holds the grid index of each row when x is a pruned subset."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = self.mat_qkv(x, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, hd)
        # Bound the learned temperature at 100 (the last head of real checkpoints sits above it).
        scale = self.scale_mul_1H11.float().clamp_max(self.max_log_scale).exp()  # fp32 even when stored in bf16
        # q, k, v stay strided views of qkv: RoPE writes fresh tensors, the cache copies what it keeps
        # and SDPA reads any strides, so no extra copy is made for a "contiguous" layout.
        q = F.normalize(q.float(), dim=-1, eps=1e-12).mul(scale)
        k = F.normalize(k.float(), dim=-1, eps=1e-12)
        cos, sin = attn.rope[0], attn.rope[1]  # (L, hd/2) each
        if keep is not None:  # each kept token keeps the angles of its own grid position
            cos, sin = cos[keep][:, None], sin[keep][:, None]  # (B, 1, K, hd/2)
        # Scale, norms and RoPE ran in fp32; attention runs in the compute dtype (the product's, v's).
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if attn.cache is not None:
            k, v = attn.cache.extend(k, v, attn.store)
        probes = ATTENTION_PROBES.get()
        if probes is not None and self in probes:
            probes[self](q, k)
        # The cache may hold keys and values in a narrower dtype than q (bf16 weights, fp32 compute); the
        # cosine scale is already folded into q.
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn.mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))  # (B, H, L, hd) -> (B, L, C)


@dataclass
class Text:
    """The text tokens that cross-attention attends to, packed without padding as upstream packs them.

    tokens[g] (N_g, C) is a pack of tokens; batch row r attends to tokens[g][start:end] with
    (g, start, end) = rows[r]. The model packs every row's text together (one pack); parity.py
    conditions each image on its own and keeps one pack per image. Each cross-attention computes its
    keys and values of the packs once per generation and keeps them in `kv`.
    """
    tokens: list[torch.Tensor]
    rows: list[tuple[int, int, int]]
    kv: dict = field(default_factory=dict)

    def segment(self, k: int) -> Text:
        """Only half k of the rows (0: the prompts', 1: the negative or null prompts'), sharing `kv`."""
        n = len(self.rows) // 2
        return Text(self.tokens, self.rows[k * n: (k + 1) * n], self.kv)


class CrossAttention(nn.Module):
    """Attention from queries to text tokens; each batch row sees only its own text.

    With `pool=True` the query is a learned parameter (one query per image), which turns this into
    attention pooling of the text into a single vector.
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, pool: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.pool = heads, dim // heads, pool
        if pool:
            self.mat_q = nn.Parameter(torch.randn(1, heads, self.head_dim) * math.sqrt(1 / dim / 3))
        else:
            self.mat_q = Linear(dim, dim)
        self.mat_kv = Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor | None, text: Text, rows: int | None = None) -> torch.Tensor:
        """x (R, L, C) -> (R, L, C); in pool mode x is ignored and `rows` (R, 1, C) are returned."""
        H, hd = self.heads, self.head_dim
        if self not in text.kv:  # the text's keys and values, once per generation
            bias = torch.cat((self.zero_k_bias, self.v_bias))
            text.kv[self] = [self.mat_kv(t, bias).view(t.shape[0], 2, H, hd) for t in text.tokens]
        if self.pool:
            R, L = rows, 1
            q = self.mat_q.to(self.mat_kv.compute_dtype).expand(R, -1, -1)[:, :, None]  # (R, H, 1, hd)
        else:
            R, L = x.shape[:2]
            q = self.mat_q(x).view(R, L, H, hd).transpose(1, 2)  # (R, H, L, hd)
        # Every row's keys and values, padded to the longest text; the mask hides the padding.
        own = [text.kv[self][g][s:e] for g, s, e in text.rows]
        kv = nn.utils.rnn.pad_sequence(own, batch_first=True).to(q.dtype)  # (R, n, 2, H, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (R, H, n, hd)
        lengths = torch.tensor([t.shape[0] for t in own], device=q.device)
        mask = torch.arange(kv.shape[1], device=q.device) < lengths[:, None, None, None]  # (R, 1, 1, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (R, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(R, L, -1))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# --------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)  # per-block offset of the shared AdaLN
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ca_norm = LayerNorm(C, eps=cfg.norm_eps)
        self.ffn = FFN(C, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, gss: torch.Tensor, text: Text, attn: Attn,
                prune: LayerRun = DENSE) -> torch.Tensor:
        """x (B, L, C), gss (B, 1, 6, C) -> (B, L, C).

        Before each sub-layer, `prune` picks the tokens it computes (keep (B, K) grid indices, or None for
        all of them), and after it fills the sub-layer's output back in to one row per token (pruning.py).
        """
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss).unbind(2)  # 6 x (B, 1, C)
        keep, t = prune.pick(x, "sa")
        x = x + prune.fill(self.sa(ada_layer_norm(t, scale1, shift1, self.eps), attn, keep).mul_(gamma1), keep, "sa")
        keep, t = prune.pick(x, "ca")
        x = x + prune.fill(self.ca(self.ca_norm(t), text).float(), keep, "ca")
        keep, t = prune.pick(x, "ffn")
        x = x + prune.fill(self.ffn(ada_layer_norm(t, scale2, shift2, self.eps)).mul(gamma2), keep, "ffn")
        return x


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class TextPool(nn.Module):
    """`text_proj_for_sos`: a container that gives the checkpoint its key names (`text_proj_for_sos.ca.*`);
    `Infinity.condition` runs its attention pooling."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.ca = CrossAttention(cfg.embed_dim, cfg.text_channels, cfg.pool_heads, pool=True)


class AdaLNHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(C, 2 * C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)  # 2 x (B, 1, C)
        return ada_layer_norm(x, scale, shift, self.eps)


@dataclass
class Conditioning:
    """Everything derived from the text once per generation."""
    text: Text               # projected text tokens for cross-attention
    cond: torch.Tensor       # (B, C) pooled text: the start token and the head's AdaLN input
    gss: torch.Tensor        # (B, 1, 6, C) shared AdaLN modulation


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C, Ct = cfg.embed_dim, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.randn(cfg.text_maxlen, Ct) * 1.2 / Ct**0.5)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * math.sqrt(1 / C / 3))
        self.text_norm = RMSNorm(Ct, cfg.norm_eps)
        self.text_proj_for_sos = TextPool(cfg)
        self.text_proj_for_ca = nn.Sequential(Linear(Ct, C), nn.GELU(approximate="tanh"), Linear(C, C))
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        self.word_embed = Linear(cfg.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), Linear(C, 6 * C))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_nm = AdaLNHead(C, cfg.norm_eps)
        self.head = Linear(C, 2 * cfg.d_vae)
        self.rope = Rope2D(cfg.head_dim)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype the block weights are stored in (bf16 in the public checkpoints)."""
        return self.blocks[0].sa.mat_qkv.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the products and attention run in: float32 or bfloat16 (`set_compute_dtype`).
        Norms, RoPE, the residual stream, guidance and sampling stay float32 either way."""
        return self.head.compute_dtype

    def set_compute_dtype(self, dtype: torch.dtype) -> Infinity:
        """Compute every product in `dtype` from now on (the weights keep their storage dtype)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.compute_dtype = dtype
        return self

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype: half precision if the weights or the compute are (`cache_dtype`)."""
        return cache_dtype(self.compute_dtype if self.compute_dtype != torch.float32 else self.storage_dtype)

    def condition(self, kv: torch.Tensor, segments: list[tuple[int, int]]) -> Conditioning:
        """Everything the text decides, once per generation.

        kv (N, Ct) packs the T5 rows of every batch row: conditional rows of each image first, then the
        unconditional ones; segments[r] = (start, end) of batch row r. All rows are projected together, as
        one pack (parity.py's mode conditions each image of an `image_batch` on its own).
        """
        normed = Text([self.text_norm(kv)], [(0, s, e) for s, e in segments])
        cond = self.text_proj_for_sos.ca(None, normed, rows=len(segments)).squeeze(1).float()  # (R, C)
        gss = self.shared_ada_lin(cond.float()).float().view(-1, 1, 6, self.cfg.embed_dim)
        text = Text([self.text_proj_for_ca(t) for t in normed.tokens], normed.rows)  # N x (C)
        return Conditioning(text, cond, gss)

    def first_tokens(self, c: Conditioning) -> torch.Tensor:
        """The 1x1 scale's input: pooled text plus a learned start embedding, (B, 1, C)."""
        B = c.cond.shape[0]
        return c.cond.unsqueeze(1).expand(B, 1, -1) + self.pos_start.float().expand(B, 1, -1)

    def embed_scale(self, x: torch.Tensor, si: int) -> torch.Tensor:
        """Add the level embedding of scale si to its tokens x (B, L, C): the residual stream starts here,
        in float32 (in place when x already is)."""
        return x.float().add_(self.lvl_embed.weight[si].float())

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) -> (B, L, 2d): channel 2j + c is the logit of bit j taking value c."""
        return self.head(self.head_nm(x.float(), cond.float())).float()
