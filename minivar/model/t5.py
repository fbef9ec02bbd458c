"""The T5 encoder that turns Infinity's prompt tokens into text features (google/flan-t5-xl for Infinity).

A stack of pre-norm transformer blocks, each self-attention then a feed-forward layer, with T5's quirks:

* RMS layer norm: no mean subtraction and no bias, the statistic taken in fp32.
* No position embeddings. Layer 0 owns a learned bias per (relative-distance bucket, head) that is added to
  the attention scores of every layer.
* Scores are not scaled by 1/sqrt(d_kv): T5 folded that factor into the initialisation of `q`.
* flan-t5 uses a gated FFN, wo(gelu_tanh(wi_0 x) * wi_1 x); the original T5 a plain wo(relu(wi x)).

Module and parameter names follow the Hugging Face checkpoints (`encoder.block.{i}.layer.0.SelfAttention.q`,
...), so their tensors load without renaming; only the tied token embedding needs care (see `load_t5`).
The file ends with T5's tokenizer: a sentencepiece model plus T5's special tokens.

Uses config.py (JSON reading, value checks) and sentencepiece; loaded by loading/checkpoint.py (`load_t5`).
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import CheckpointError, check_int, check_positive, read_json_object


@dataclass
class T5Config:
    vocab_size: int = 32128     # rows of the shared token embedding
    d_model: int = 512          # width of the residual stream (2048 in flan-t5-xl)
    d_kv: int = 64              # width of one attention head
    d_ff: int = 2048            # hidden width of the feed-forward layer
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @classmethod
    def from_json(cls, path: str | Path) -> "T5Config":
        """Read a Hugging Face `config.json`; fields it lacks keep T5's defaults, fields we don't use are ignored."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"T5 config not found: {path} (a T5 model directory needs its config.json)")
        raw = read_json_object(path, "T5 config")
        config = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        try:
            config.check()
        except ValueError as e:
            raise CheckpointError(f"T5 config {path}: {e}") from None
        return config

    def check(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            check_int(name, getattr(self, name))
        check_positive("layer_norm_epsilon", self.layer_norm_epsilon)
        if not isinstance(self.feed_forward_proj, str) or self.feed_forward_proj not in FEED_FORWARD:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported (only "
                             f"{', '.join(FEED_FORWARD)})")

    def param_count(self) -> int:
        """Parameters of the encoder (embedding, blocks, final norm), as `T5Encoder(cfg)` holds them."""
        inner, gated = self.num_heads * self.d_kv, self.feed_forward_proj.startswith("gated")
        block = 4 * self.d_model * inner + (3 if gated else 2) * self.d_model * self.d_ff + 2 * self.d_model
        return self.vocab_size * self.d_model + self.num_layers * block + self.relative_attention_num_buckets * \
            self.num_heads + self.d_model


T5_PRESETS = {
    # the text encoder of Infinity-2B and -8B: 1,223,527,424 parameters (embedding 65.8M, 24 blocks of 48.2M)
    "flan-t5-xl": T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                           feed_forward_proj="gated-gelu"),
}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation ("gelu_new"), written out op by op like the reference implementation:
    F.gelu(approximate="tanh") is the same function but rounds differently in the last bit."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


# feed_forward_proj -> (gated?, activation)
FEED_FORWARD: dict[str, tuple[bool, Callable[[torch.Tensor], torch.Tensor]]] = {
    "gated-gelu": (True, gelu_tanh),
    "relu": (False, F.relu),
}


class T5LayerNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, statistic in fp32, cast back before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Map key-minus-query offsets to bucket ids, both directions (an encoder attends both ways).

    Half of the buckets are for keys after the query, half for keys at or before it. Within a half, small
    distances get a bucket each; larger ones share buckets whose width grows logarithmically, and every
    distance beyond max_distance falls in the last bucket.
    """
    half = num_buckets // 2
    side = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # clamp only keeps log() finite for the small distances, which take the other branch of the where()
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return side + torch.where(dist < exact, dist, far)


class Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model), bias (B, H, L, L) added to the scores -> (B, L, d_model)"""
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.n_heads, self.d_kv).transpose(1, 2)  # (B, H, L, d_kv)
                   for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, L, d_kv)
        return self.o(y.transpose(1, 2).reshape(B, L, self.n_heads * self.d_kv))  # (B, L, H * d_kv)


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated, self.act = FEED_FORWARD[cfg.feed_forward_proj]
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h.to(self.wo.weight.dtype))  # wo may be kept in fp32, see `set_dtype`


class SelfAttentionLayer(nn.Module):
    """`layer.0` of a block: a container that gives the checkpoint its key names (T5Block runs it)."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class FeedForwardLayer(nn.Module):
    """`layer.1` of a block: a container that gives the checkpoint its key names (T5Block runs it)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = FeedForward(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Pull a float16 residual stream back inside the representable range, as the reference T5 does.

    Without it one overflowing activation turns into inf and then NaN in the next layer norm. (In float16 the
    stream becomes float32 after the first FFN, see `set_dtype`, so this matters mostly in the first block.)
    """
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(cfg, has_relative_bias), FeedForwardLayer(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model), bias (B, H, L, L) -> (B, L, d_model): pre-norm self-attention, then pre-norm FFN."""
        sa, ff = self.layer
        x = clamp_fp16(x + sa.SelfAttention(sa.layer_norm(x), bias))
        return clamp_fp16(x + ff.DenseReluDense(ff.layer_norm(x)))


class Stack(nn.Module):
    """The `encoder.*` of the checkpoints: embedding, blocks and final norm (T5Encoder.forward runs them)."""

    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        # one embedding under two names, as in the checkpoints: `shared.weight` and `encoder.embed_tokens.weight`
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, self.shared)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) long, attention_mask (B, L) 1 = real token -> last_hidden_state (B, L, d_model)

        Rows of padded positions are computed too but mean nothing; Infinity keeps only the real ones.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        stack, cfg, L = self.encoder, self.cfg, input_ids.shape[1]
        # One additive score bias (B, H, L, L) for every layer: layer 0's learned bias per relative-distance
        # bucket and head, and the most negative value on padded keys (softmax gives them exactly zero weight).
        pos = torch.arange(L, device=input_ids.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)  # (L, L), [query, key]
        bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, L, L)
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        bias = torch.where(keep, bias, torch.finfo(bias.dtype).min)
        x = stack.embed_tokens(input_ids)  # (B, L, d_model)
        for block in stack.block:
            x = block(x, bias)
        return stack.final_layer_norm(x)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint key names (loading: minivar.loading.checkpoint.load_t5)

# The token embedding is one tensor with two names; a file may store either name, or both.
TIED_EMBEDDING = ("shared.weight", "encoder.embed_tokens.weight")


def is_encoder_key(key: str) -> bool:
    """Keep the encoder and the embedding; decoder.* and lm_head.* of full checkpoints are never read."""
    return key.startswith("encoder.") or key in TIED_EMBEDDING


# ----------------------------------------------------------------------------------------------------------
# The T5 tokenizer: a sentencepiece unigram model plus T5's special tokens, padded to a fixed length.
#
# It reproduces Hugging Face's `T5Tokenizer(legacy=True)` called with `padding="max_length",
# truncation=True`, which is what Infinity feeds its T5 encoder:
#
#     "a red apple" -> pieces ▁a ▁re d ▁apple -> ids 3 150 68 185 1 0 0 ... (EOS 1, then pad 0 up to max_length;
#                                                                       ids of the tiny test vocabulary)
#
# The special tokens (`</s>`, `<pad>`, `<unk>` and the 100 sentinels `<extra_id_N>`) are matched in the raw
# text first; the text between them is handed to sentencepiece chunk by chunk, so each chunk gets its own
# dummy-prefix "▁". Sentencepiece does the rest: NFKC normalisation, whitespace collapsing, unknown -> id 2.
# ----------------------------------------------------------------------------------------------------------
class Tokenizer:
    def __init__(self, model_file: str | Path, extra_ids: int = 100):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{model_file} is not a sentencepiece model ({str(e).strip()[:160]}); "
                                  "re-download the tokenizer") from None
        self.extra_ids = extra_ids
        self.eos_id, self.pad_id = self.sp.eos_id(), self.sp.pad_id()
        self.vocab_size = self.sp.get_piece_size() + extra_ids
        self.special = self._special_tokens()
        # longest first, so that a token is never matched by a shorter one that is its prefix
        alternatives = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `path/spiece.model`; `path/tokenizer_config.json`, when present, sets the number of sentinels."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"tokenizer directory not found: {path} "
                                  "(check the path, or run `minivar download MODEL`)")
        model_file = path / "spiece.model"
        if not model_file.is_file():
            raise CheckpointError(f"tokenizer directory {path} has no spiece.model (is it a T5 model directory?)")
        extra_ids = 100
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            extra_ids = read_json_object(config_file, "tokenizer config").get("extra_ids", 100)
            if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or not 0 <= extra_ids <= 10_000:
                raise CheckpointError(f"tokenizer config {config_file}: extra_ids={extra_ids!r} is invalid: it must "
                                      "be an integer in 0..10000")
        return cls(model_file, extra_ids)

    def _special_tokens(self) -> dict[str, int]:
        # sentinels sit above the sentencepiece vocabulary in reverse: <extra_id_0> is the last id
        special = {self.sp.id_to_piece(i): i for i in (self.pad_id, self.eos_id, self.sp.unk_id())}
        special |= {f"<extra_id_{n}>": self.vocab_size - 1 - n for n in range(self.extra_ids)}
        return special

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS and without truncation."""
        ids = []
        for i, chunk in enumerate(self._split.split(text)):
            if i % 2:  # re.split puts the matched separators at odd positions
                ids.append(self.special[chunk])
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids

    def __call__(self, texts: str | list[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize a prompt or a batch of prompts -> (input_ids (B, max_length), attention_mask (B, max_length)).

        Each row is the prompt's ids, cut to max_length - 1 when too long, then EOS, then padding. The mask is 1
        on the ids and the EOS, 0 on the padding. Both are int64.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) + 1 > max_length:
                warnings.warn(f"T5 prompt truncated: {len(ids) + 1} tokens (with EOS) exceed max_length {max_length}; "
                              f"the last {len(ids) + 1 - max_length} were dropped", stacklevel=2)
                ids = ids[:max_length - 1]
            ids = ids + [self.eos_id]
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        return input_ids, attention_mask
