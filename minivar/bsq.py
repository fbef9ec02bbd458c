"""Binary spherical quantisation (BSQ) over a pyramid of scales.

A latent vector of d channels is quantised to d bits: each channel becomes +-1/sqrt(d) by its sign
after the vector is L2-normalised, so every code lies on the unit sphere. Infinity stacks this as
residual quantisation over scales: scale si sees the residual area-downsampled to its grid, and its
codes are trilinearly upsampled back to the final grid, subtracted from the residual and added to the
running sum `z`. The transformer predicts those bits scale by scale and rebuilds the same sum.

Every operation below mirrors upstream's op order and memory layout, because the golden fixtures are
matched bit for bit: the layout decides the summation order of norms and of the interpolations.

Shapes: B batch, d bits, t (always 1 for images) x h x w the grid of one scale, T x H x W the final grid.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UP_MODE = "trilinear"  # codes of a coarse scale -> final grid, and the running sum -> next grid
DOWN_MODE = "area"  # residual -> the grid of the scale being quantised

Scale = tuple[int, int, int]  # (t, h, w)


def codebook_scale(d: int) -> float:
    """The magnitude 1/sqrt(d) of every code channel, in float64 like upstream's (torch rounds it to
    float32 when multiplying)."""
    return 1 / math.sqrt(d)


# ---------------------------------------------------------------------------------------------
# bits <-> codes, one scale at a time


def bits_to_codes(bits: Tensor) -> Tensor:
    """Bits (B, 1, h, w, d) or (B, h, w, d), values 0/1 -> codes (B, d, 1, h, w) float32.

    Upstream `indices_to_codes(label_type='bit_label')`: b * s * 2 - s with s = 1/sqrt(d), then an L2
    normalisation over d on the contiguous (..., 1, d) tensor. The result is a permuted view
    (channels-last in memory), as upstream's; interpolating it keeps that layout, which the decoder's
    bit parity depends on.
    """
    if bits.ndim == 4:
        bits = bits.unsqueeze(1)  # (B, 1, h, w, d)
    s = codebook_scale(bits.shape[-1])
    codes = bits.to(torch.float32).unsqueeze(-2) * s * 2 - s  # (B, 1, h, w, 1, d)
    codes = F.normalize(codes, dim=-1).flatten(-2)  # (B, 1, h, w, d)
    return codes.permute(0, 4, 1, 2, 3)  # (B, d, 1, h, w)


def quantize_one_scale(x_Bdthw: Tensor, straight_through: bool = False) -> tuple[Tensor, Tensor]:
    """Quantise each d-vector of x (B, d, t, h, w) -> (codes (B, d, t, h, w), bits (B, t, h, w, d) int64).

    The vectors are normalised in upstream's packed (B, t*h*w, 1, d) contiguous layout (another layout
    can move the norm by one ulp), and the codes keep the form z + (zhat - z), which can differ from
    zhat itself by one ulp. With `straight_through` the difference is detached, so in the backward pass
    the sign acts as the identity on the normalised vector (how the VAE trains through the quantiser).
    """
    B, d, t, h, w = x_Bdthw.shape
    z = x_Bdthw.permute(0, 2, 3, 4, 1).reshape(B, t * h * w, 1, d).contiguous()  # (B, thw, 1, d)
    z = F.normalize(z, dim=-1)
    zhat = torch.where(z > 0, 1.0, -1.0).to(z.dtype) * (1.0 / d**0.5)
    quantized = z + ((zhat - z).detach() if straight_through else (zhat - z))
    bits = (quantized > 0).to(torch.int64).reshape(B, t, h, w, d)  # (B, t, h, w, d)
    codes = quantized.reshape(B, t, h, w, d).permute(0, 4, 1, 2, 3)  # (B, d, t, h, w)
    return codes, bits


# ---------------------------------------------------------------------------------------------
# the multi-scale residual quantiser (VAE encode path)


def _as_scales(scales) -> list[Scale]:
    """Accept a list of (t, h, w) tuples or an int tensor of shape (S, 3)."""
    return [tuple(int(v) for v in s) for s in scales]


def quantize_multiscale(h: Tensor, scales: list[Scale], *, keep: int | None = None, straight_through: bool = False,
                        perturb: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Residual BSQ over `scales` of the encoder output h (B, d, H, W) or (B, d, 1, H, W).

    Returns z (B, d, H, W), the sum of the upsampled codes of all scales; the bits of every scale
    (B, t, h, w, d) int64; and for every scale but the last the running sum area-downsampled to the
    next scale's grid (B, d, t', h', w'), i.e. what a teacher-forced transformer sees as input.

    Training options: `keep` quantises only the first scales (z is their sum); `straight_through`
    lets gradients reach h; `perturb(bits)` returns the bits whose codes enter the running sum in
    place of the true ones (Infinity's bitwise self-correction; the returned bits stay the true ones).
    It is called for every scale but the last, in order.
    """
    scales = _as_scales(scales)[:keep]
    x = (h.unsqueeze(2) if h.ndim == 4 else h).contiguous()  # (B, d, T, H, W)
    full = tuple(x.shape[2:])
    residual, z_BdTHW = x, torch.zeros_like(x)
    bits_list, next_inputs = [], []
    for si, scale in enumerate(scales):
        r = residual if scale == full else F.interpolate(residual, size=scale, mode=DOWN_MODE)
        codes, bits = quantize_one_scale(r, straight_through)
        bits_list.append(bits)
        if perturb is not None and si != len(scales) - 1:
            entered = perturb(bits)
            if entered is not bits:
                codes = bits_to_codes(entered)
        if scale != full:
            codes = F.interpolate(codes, size=full, mode=UP_MODE).contiguous()
        residual = residual - codes
        z_BdTHW = z_BdTHW + codes
        if si != len(scales) - 1:
            next_inputs.append(F.interpolate(z_BdTHW, size=scales[si + 1], mode=DOWN_MODE).contiguous())
    z = z_BdTHW.contiguous()
    return (z.squeeze(2) if z.shape[2] == 1 else z), bits_list, next_inputs


def make_mask(d: int) -> Tensor:
    """(2^(d-1), ..., 2, 1): the weights that turn bits into an integer code index, MSB first."""
    return 2 ** torch.arange(d - 1, -1, -1)


class BSQ(nn.Module):
    """Holds the single-scale quantiser's one buffer, `mask`, so checkpoints load strictly.

    minivar works on bits directly and never reads it, but upstream checkpoints carry the buffer.
    """

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("mask", make_mask(d))


class MultiScaleBSQ(nn.Module):
    """The VAE's quantiser module: `lfq` (upstream's name) holds the buffer, forward runs the pyramid."""

    def __init__(self, d: int):
        super().__init__()
        self.lfq = BSQ(d)

    def forward(self, h: Tensor, scales: list[Scale]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        return quantize_multiscale(h, scales)


# ---------------------------------------------------------------------------------------------
# rebuilding the latent from bits during generation: each scale's codes are added to a running sum


def add_scale_codes(summed_Bd1HW: Tensor | None, codes_Bd1hw: Tensor, final: Scale, last: bool) -> Tensor:
    """Add one scale's codes (B, d, 1, h, w) to the running sum on the final grid (B, d, 1, H, W), in place.

    Every scale but the last is upsampled trilinearly to the final grid; the last is added as it is.
    """
    if not last:
        codes_Bd1hw = F.interpolate(codes_Bd1hw, size=final, mode=UP_MODE)
    return codes_Bd1hw if summed_Bd1HW is None else summed_Bd1HW.add_(codes_Bd1hw)


def bits_to_vae_layout(bits_Bhwd: Tensor, patchify: bool) -> Tensor:
    """Transformer bits (B, h, w, d) -> VAE bits (B, 1, h', w', d'); 2x2 unpatchify for Infinity-8B."""
    if patchify:
        bits_Bhwd = F.pixel_shuffle(bits_Bhwd.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # (B, 2h, 2w, d/4)
    return bits_Bhwd.unsqueeze(1)


def latent_to_tokens(summed_Bd1HW: Tensor, hw: tuple[int, int], patchify: bool) -> Tensor:
    """The running sum resized to the next scale's grid, as transformer inputs (B, h*w, d) (2x2 patchified
    for Infinity-8B, whose tokens hold 2x2 VAE cells)."""
    h, w = (2 * hw[0], 2 * hw[1]) if patchify else hw
    x = F.interpolate(summed_Bd1HW, size=(1, h, w), mode=UP_MODE).squeeze(-3)  # (B, d, h, w)
    if patchify:
        x = F.pixel_unshuffle(x, 2)  # (B, 4d, h/2, w/2)
    return x.reshape(*x.shape[:2], -1).permute(0, 2, 1)  # (B, h*w, d)


def codes_from_bits(bits_list: list[Tensor], scales: list[Scale]) -> Tensor:
    """Replay the latent the transformer builds from its per-scale bits: (B, d, 1, H, W).

    Like upstream's, the result is channels-last in memory; `BSQVAE.decode` of its `.squeeze(2)`
    reproduces upstream images bit for bit.
    """
    scales = _as_scales(scales)
    summed = None
    for si, bits in enumerate(bits_list):
        summed = add_scale_codes(summed, bits_to_codes(bits), scales[-1], last=si == len(scales) - 1)
    return summed
