"""The reference numerics (`numerics="reference"`, numerics.py): minivar's CPU numbers equal upstream's bit for bit.

`apply(model)` puts a plain `Infinity` (model/transformer.py) in this mode, in place, by swapping the
class of some of its modules for the subclasses below; `numerics.prepare` calls it when a pipeline is
loaded with the reference numerics, and the toy training applies it to the model it trains. None of
this is part of the VAR algorithm: the plain model, which the other numerics run, is correct without
it. It exists because minivar promises upstream's sampled bits, and an image's bits are decided by
comparisons of float logits, so every rounding difference can flip a bit and change the picture from
that scale on. What breaks without each piece:

* `ParityLinear` (fp32 math on CPU): weights may be stored in bfloat16; upstream's CPU numbers were computed
  in float32, so on CPU every product upcasts its weights and computes in fp32 (`compute_dtype`),
  whatever the model's own compute dtype says. On CUDA the storage dtype is the compute dtype.
  The split-bias products (self-attention's qkv, the text keys and values) go through it too.
* Batch invariance (`image_batch`, `linear`): BLAS picks its kernels, and with them the rounding of
  every output, by the shape of the product, row count included. With several images in a batch,
  every product therefore runs image by image, on exactly the rows (and row count) a single-image
  run would have, in the same contiguous layout (a strided view of the same rows can take another
  kernel: on AMD EPYC a 10x96 @ 96x64 product of a strided view and of its contiguous copy differ in
  the last bit). Measured on the tiny fixture (Intel Xeon, AVX-512): computing the batch as a whole
  moved an image's logits by up to 8e-5 (relative) against its single-image run, enough to flip
  bits; image by image they are identical, so `generate([a, b])` gives image a the logits of
  `generate(a)` bit for bit. `Infinity.condition` conditions each image on its own for the same reason.
* `CrossAttention` (`text_attention`): upstream's cross-attention is a variable-length flash kernel
  that always runs in bfloat16. Rounding q, k, v and the output through bf16 is therefore part of
  the model's numbers; computing it in fp32 instead moves the tiny fixture's teacher-forced logits
  by up to 3e-3 (relative) and changes 837 of its sampled bits at 1024, from the fifth scale on.
  Each batch row attends to its own text segment in its own call, so that a row's result does not
  depend on the lengths of the other rows' prompts. On CUDA with flash-attn installed this is
  upstream's own kernel (`flash`); elsewhere SDPA's plain (math) kernel, which upstream's CPU
  numbers were recorded with. (Self-attention calls torch SDPA, which picks its own kernel on CUDA.)
* `reference_mode()`: ATen picks vectorised CPU kernels per instruction set, and its AVX-512 and
  AVX2 kernels round elementwise ops (GELU, exp, normalisation) differently. The upstream fixtures
  were recorded with AVX2 kernels. Importing minivar changes nothing in the process; the tests and
  parity checks opt in, before torch runs its first kernel, by calling `reference_mode()` or by
  setting `ATEN_CPU_CAPABILITY=avx2` in the environment.

Uses torch and model/transformer.py only.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import transformer
from .model.transformer import Conditioning, Text

try:  # optional CUDA kernel; never required
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

TEXT_ATTENTION_DTYPE = torch.bfloat16
REFERENCE_CAPABILITY = "avx2"


def reference_mode() -> None:
    """Ask ATen for the AVX2 kernels that upstream's reference numbers were recorded with.

    Call it before torch runs its first kernel (ATen fixes its choice then, once per process); on a
    CPU without AVX2 it does nothing. Raises RuntimeError if torch already settled on AVX-512.
    This is all a process can set: oneDNN and MKL round per CPU (and MKL per threading mode), so on a
    CPU other than the one a fixture was recorded on, sampled bits match but logits agree only to
    about 1e-5 (AMD EPYC, Intel Xeon AVX-512) or 7e-5 (Intel Xeon with AMX, MKL held to AVX2); see
    the README, "Numerics and reproducibility". Load with `numerics="reference"` as well.
    """
    os.environ["ATEN_CPU_CAPABILITY"] = REFERENCE_CAPABILITY
    chosen = torch.backends.cpu.get_cpu_capability()
    if chosen.startswith("AVX512"):
        raise RuntimeError(f"torch already chose {chosen} kernels: set ATEN_CPU_CAPABILITY=avx2 in the environment, "
                           "or call minivar.parity.reference_mode() before running any torch op")


def apply(model: transformer.Infinity) -> ParityInfinity:
    """Put `model` in parity mode, in place, and return it: every module whose numbers upstream's
    differ from the plain model's becomes the parity subclass of its class (same parameters, same
    state dict keys). Applying it twice changes nothing."""
    for module in model.modules():
        module.__class__ = PARITY_CLASSES.get(type(module), type(module))
    return model


# --------------------------------------------------------------------------------------------------
# Batch invariance. While `image_batch(n)` is active, the batch rows form n images: rows b, b + n,
# b + 2n ... belong to image b (conditional rows first, then unconditional ones), and every product
# runs one image at a time. A batch of one image is computed as a whole.
# --------------------------------------------------------------------------------------------------
_IMAGES: ContextVar[int] = ContextVar("images", default=1)


@contextmanager
def image_batch(n: int):
    token = _IMAGES.set(n)
    try:
        yield
    finally:
        _IMAGES.reset(token)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """fp32 (the input's dtype) on CPU, the weights' storage dtype elsewhere."""
    return x.dtype if x.device.type == "cpu" else weight.dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in `compute_dtype`, row-wise on x (R, ...) one image's rows at a time.

    Each image's rows reach the product as a fresh contiguous tensor: the shape, strides and alignment
    a single-image run gives its own (contiguous) input, so BLAS takes the same kernel for both on any
    CPU. The model only hands contiguous inputs to its products (tests/test_numerics.py checks it).
    """
    dt = compute_dtype(x, weight)
    w, b, x = weight.to(dt), None if bias is None else bias.to(dt), x.to(dt)
    n, R = _IMAGES.get(), x.shape[0]
    if n == 1 or R % n:
        return F.linear(x, w, b)
    groups = torch.arange(R, device=x.device).view(R // n, n).t()  # (n, R/n): the rows of each image
    outs = [F.linear(x[rows].contiguous(), w, b) for rows in groups]  # advanced indexing copies: contiguous already
    out = outs[0].new_empty(R, *outs[0].shape[1:])
    for rows, o in zip(groups, outs):
        out[rows] = o
    return out


class ParityLinear(transformer.Linear):
    """The model's Linear computed by `linear`: bf16-stored weights give fp32 math on CPU, image by image
    (its own `compute_dtype` is not read)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias if bias is None else bias)


# --------------------------------------------------------------------------------------------------
# Text: each image conditioned on its own, cross-attention through bf16, one row at a time
# --------------------------------------------------------------------------------------------------
class ParityInfinity(transformer.Infinity):
    """The model, with the text of each image of an `image_batch` conditioned as a single image's."""

    def condition(self, kv: torch.Tensor, segments: list[tuple[int, int]]) -> Conditioning:
        """As `transformer.Infinity.condition`, image by image: image b owns batch rows b, b + n, ... and
        gets its own text pack; its rows return to their places in the batch."""
        n = _IMAGES.get()
        if n == 1 or len(segments) % n:
            return super().condition(kv, segments)
        parts = []
        with image_batch(1):
            for b in range(n):
                own = [kv[s:e] for s, e in segments[b::n]]
                ends = torch.tensor([t.shape[0] for t in own]).cumsum(0).tolist()
                parts.append(super().condition(torch.cat(own), list(zip([0] + ends[:-1], ends))))
        rows = [(r % n, *parts[r % n].text.rows[r // n][1:]) for r in range(len(segments))]
        text = Text([p.text.tokens[0] for p in parts], rows)
        cond = torch.stack([p.cond for p in parts], dim=1).flatten(0, 1)  # (R/n, n, C) -> (R, C): row r is image r % n
        gss = torch.stack([p.gss for p in parts], dim=1).flatten(0, 1)    # (R, 1, 6, C) likewise
        return Conditioning(text, cond, gss)


class ParityCrossAttention(transformer.CrossAttention):
    """Cross-attention as upstream's kernel computes it: `text_attention`, keys and values per text pack."""

    def forward(self, x: torch.Tensor | None, text: Text, rows: int | None = None) -> torch.Tensor:
        """x (R, L, C) -> (R, L, C); in pool mode x is ignored and `rows` (R, 1, C) are returned."""
        if self not in text.kv:  # keys and values of each text pack (an image's), once per generation
            bias = torch.cat((self.zero_k_bias, self.v_bias))
            with image_batch(1):
                text.kv[self] = [self.mat_kv(t, bias).view(t.shape[0], 2, self.heads, self.head_dim)
                                 .to(TEXT_ATTENTION_DTYPE) for t in text.tokens]
        if self.pool:
            R, L = rows, 1
            q = self.mat_q.float().repeat(R, 1, 1)[:, None]  # (R, 1, H, hd)
        else:
            R, L = x.shape[:2]
            q = self.mat_q(x).view(R, L, self.heads, self.head_dim)
        out = text_attention(q, text.kv[self], text.rows, 1 / math.sqrt(self.head_dim))  # (R, L, H, hd)
        return self.proj(out.reshape(R, L, -1))


def text_attention(q: torch.Tensor, kv: list[torch.Tensor], rows: list[tuple[int, int, int]],
                   scale: float) -> torch.Tensor:
    """Each batch row attends only to its own text segment, through bf16; returns float32.

    q (R, Lq, H, hd); kv[g] (N_g, 2, H, hd) are the bf16 keys and values of text pack g; rows[r] =
    (g, start, end) for row r. Returns (R, Lq, H, hd).
    """
    q, use_flash = q.to(TEXT_ATTENTION_DTYPE), flash_attn_func is not None and q.is_cuda
    outs = []
    with sdpa_kernel(SDPBackend.MATH) if not q.is_cuda else nullcontext():
        for r, (g, s, e) in enumerate(rows):
            k, v = kv[g][s:e].unbind(1)                                        # (n, H, hd) each
            qr, kr, vr = q[r].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, H, n, hd)
            if use_flash:
                out = flash(qr, kr, vr, scale)
            else:
                out = F.scaled_dot_product_attention(qr.float(), kr.float(), vr.float(), scale=scale).to(q.dtype)
            outs.append(out[0].transpose(0, 1))                                # (Lq, H, hd)
    return torch.stack(outs).float()


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """flash-attn (upstream's kernel) for half-precision CUDA tensors without a mask:
    q (B, H, Lq, hd), k and v (B, H, Lk, hd) -> (B, H, Lq, hd)."""
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2)  # (B, Lq, H, hd) -> (B, H, Lq, hd)


PARITY_CLASSES: dict[type, type] = {transformer.Linear: ParityLinear, transformer.CrossAttention: ParityCrossAttention,
                                    transformer.Infinity: ParityInfinity}
