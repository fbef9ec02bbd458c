"""The numerics layer: everything that makes minivar's CPU numbers equal upstream's, in one place.

None of this is part of the VAR algorithm; transformer.py would be correct without any of it. It is
here because minivar promises upstream's sampled bits bit for bit, and an image's bits are decided
by comparisons of float logits, so every rounding difference can flip a bit and change the picture
from that scale on. Each piece says what breaks without it.

* `compute_dtype`, `Linear`, `LayerNorm`, `cache_dtype`: weights may be stored in bfloat16, but CPUs
  multiply bf16 matrices about 400x slower than fp32 (0.3 vs 130 GFLOP/s on a 2048x2048x8192 product
  on the project machine), so on CPU every matmul and norm computes in fp32. On CUDA the storage
  dtype is the compute dtype. The KV cache is stored in the weights' dtype: with bf16 weights,
  rounding the cached keys and values to bf16 halves the cache and moves sampled bits about as much
  as rounding the weights does (README, "Running Infinity-2B on a laptop").
* Batch invariance (`image_batch`, `per_image`): BLAS picks its kernels, and with them the
  rounding of every output, by the shape of the product, row count included. With several images
  in a batch, every product therefore runs image by image, on exactly the rows (and row count) a
  single-image run would have, in the same contiguous layout (a strided view of the same rows can
  take another kernel: on AMD EPYC a 10x96 @ 96x64 product of a strided view and of its contiguous
  copy differ in the last bit). Measured on the tiny fixture (Intel Xeon, AVX-512): computing the
  batch as a whole moved an image's logits by up to 8e-5 (relative) against its single-image run,
  enough to flip bits; image by image they are identical, so `generate([a, b])` gives image a the
  logits of `generate(a)` bit for bit.
* `attend`: the one attention kernel choice. flash-attn on CUDA when installed, otherwise SDPA in
  fp32 (the formulation upstream's CPU numbers were recorded with).
* `text_attention`: upstream's cross-attention is a variable-length flash kernel that always runs
  in bfloat16. Rounding q, k, v and the output through bf16 is therefore part of the model's
  numbers; computing it in fp32 instead moves the tiny fixture's teacher-forced logits by up to
  3e-3 (relative) and changes 837 of its sampled bits at 1024, from the fifth scale on. Each
  batch row attends to its own text segment in its own call (`Text` groups the segments by image),
  so that a row's result does not depend on the lengths of the other rows' prompts.
* `reference_mode()`: ATen picks vectorised CPU kernels per instruction set, and its AVX-512 and
  AVX2 kernels round elementwise ops (GELU, exp, normalisation) differently. The upstream
  fixtures were recorded with AVX2 kernels. Importing minivar changes nothing in the process; the
  tests and parity checks opt in, before torch runs its first kernel, by calling
  `reference_mode()` or by setting `ATEN_CPU_CAPABILITY=avx2` in the environment.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional CUDA kernel; never required
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:
    _flash_attn_func = None

TEXT_ATTENTION_DTYPE = torch.bfloat16
REFERENCE_CAPABILITY = "avx2"


def reference_mode() -> None:
    """Ask ATen for the AVX2 kernels that upstream's reference numbers were recorded with.

    Call it before torch runs its first kernel (ATen fixes its choice then, once per process); on a
    CPU without AVX2 it does nothing. Raises RuntimeError if torch already settled on AVX-512.
    """
    os.environ["ATEN_CPU_CAPABILITY"] = REFERENCE_CAPABILITY
    chosen = torch.backends.cpu.get_cpu_capability()
    if chosen.startswith("AVX512"):
        raise RuntimeError(f"torch already chose {chosen} kernels: set ATEN_CPU_CAPABILITY=avx2 in the environment, "
                           "or call minivar.numerics.reference_mode() before running any torch op")


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """fp32 (the input's dtype) on CPU, the weights' storage dtype elsewhere."""
    return x.dtype if x.device.type == "cpu" else weight.dtype


def cache_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The KV cache stores keys and values like the weights: bf16 (fp16) with half-precision weights,
    float32 otherwise. It is the largest buffer of a generation after the weights (6.3 GiB in float32
    for Infinity-2B at 1024x1024 unpruned), and attention reads it back in float32 on CPU."""
    return weight_dtype if weight_dtype in (torch.bfloat16, torch.float16) else torch.float32


# --------------------------------------------------------------------------------------------------
# Batch invariance. While `image_batch(n)` is active, the batch rows form n images: rows b, b + n,
# b + 2n ... belong to image b (conditional rows first, then unconditional ones), and row-wise ops
# run one image at a time. A batch of one image is computed as a whole.
# --------------------------------------------------------------------------------------------------
_IMAGES: ContextVar[int] = ContextVar("images", default=1)


@contextmanager
def image_batch(n: int):
    token = _IMAGES.set(n)
    try:
        yield
    finally:
        _IMAGES.reset(token)


def images_in_batch() -> int:
    """The n of the innermost `image_batch(n)` (1 outside any)."""
    return _IMAGES.get()


def per_image(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn applied row-wise to x (R, ...), one image's rows at a time.

    Each image's rows reach `fn` as a fresh contiguous tensor: the shape, strides and alignment a
    single-image run gives its own (contiguous) input, so BLAS takes the same kernel for both on any
    CPU. The model only hands contiguous inputs to its products (tests/test_numerics.py checks it).
    """
    n, R = _IMAGES.get(), x.shape[0]
    if n == 1 or R % n:
        return fn(x)
    groups = torch.arange(R, device=x.device).view(R // n, n).t()  # (n, R/n): the rows of each image
    outs = [fn(x[rows].contiguous()) for rows in groups]  # advanced indexing copies: contiguous already
    out = outs[0].new_empty(R, *outs[0].shape[1:])
    for rows, o in zip(groups, outs):
        out[rows] = o
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in `compute_dtype`, batch-invariant for small inputs."""
    dt = compute_dtype(x, weight)
    w, b = weight.to(dt), None if bias is None else bias.to(dt)
    return per_image(lambda t: F.linear(t, w, b), x.to(dt))


class Linear(nn.Linear):
    """nn.Linear computed by `linear`: bf16-stored weights give fp32 math on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the storage dtype of its parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


# --------------------------------------------------------------------------------------------------
# Attention kernels
# --------------------------------------------------------------------------------------------------
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, q (B, H, Lq, hd), k and v (B, H, Lk, hd) -> (B, H, Lq, hd) in q's dtype.

    `mask` (Lq, Lk) is boolean, True where attention is allowed. flash-attn runs only when it is
    installed, the tensors are half precision on CUDA and there is no mask; otherwise SDPA runs in
    float32 (half inputs upcast, the output cast back).
    """
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and mask is None:
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)  # (B, Lq, H, hd) -> (B, H, Lq, hd)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
    return out.to(q.dtype)


def text_kv(x: torch.Tensor) -> torch.Tensor:
    """Text keys and values as the cross-attention kernel holds them (bf16)."""
    return x.to(TEXT_ATTENTION_DTYPE)


def text_attention(q: torch.Tensor, kv: list[torch.Tensor], segments: list[tuple[int, int, int]],
                   scale: float) -> torch.Tensor:
    """Each batch row attends only to its own text segment, through bf16; returns float32.

    q (R, Lq, H, hd); kv[b] (N_b, 2, H, hd) are image b's keys and values (from `text_kv`);
    segments[r] = (b, start, end) for row r. Returns (R, Lq, H, hd). Off CUDA the attention uses
    SDPA's plain (math) kernel, the formulation upstream's CPU numbers were recorded with.
    """
    q = q.to(TEXT_ATTENTION_DTYPE)
    outs = []
    with sdpa_kernel(SDPBackend.MATH) if not q.is_cuda else nullcontext():
        for r, (b, s, e) in enumerate(segments):
            k, v = kv[b][s:e].unbind(1)                # (n, H, hd) each
            out = attend(q[r].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale)
            outs.append(out[0].transpose(0, 1))        # (Lq, H, hd)
    return torch.stack(outs).float()


@dataclass
class Text:
    """Text tokens grouped by image, for the R = n_images * k batch rows (k = 2 with guidance).

    tokens[b] (N_b, C) holds image b's rows' tokens back to back: its conditional segment, then its
    unconditional one. Batch row r belongs to image r % n_images and uses segment r // n_images of it.
    Each cross-attention computes its keys and values once per generation and keeps them in `kv`.
    """
    tokens: list[torch.Tensor]
    segments: list[list[tuple[int, int]]]
    kv: dict = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, row_segments: list[tuple[int, int]], n_images: int) -> Text:
        """Regroup packed rows (N, C) with one (start, end) per batch row into per-image groups."""
        tokens, segments = [], []
        for b in range(n_images):
            parts = [rows[s:e] for s, e in row_segments[b::n_images]]
            ends = torch.tensor([p.shape[0] for p in parts]).cumsum(0).tolist()
            tokens.append(torch.cat(parts))
            segments.append(list(zip([0] + ends[:-1], ends)))
        return cls(tokens, segments)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Text:
        return Text([fn(t) for t in self.tokens], self.segments)

    def segment(self, k: int) -> Text:
        """Only segment k of every image (0: the prompt, 1: the negative or null prompt), sharing `kv`."""
        return Text(self.tokens, [[segs[k]] for segs in self.segments], self.kv)

    def row_segments(self, rows: int) -> list[tuple[int, int]]:
        """(image, start, end) of the text each of `rows` batch rows attends to."""
        n = len(self.tokens)
        return [(r % n, *self.segments[r % n][r // n]) for r in range(rows)]
