"""Infinity's BSQ VAE: a flux-style convolutional encoder and decoder around a multi-scale bit quantiser.

The encoder maps an image (B, 3, H, W) in [-1, 1] to a latent h (B, d, H/p, W/p), p = patch_size; the
quantiser (part 1 below) turns h into d bits per position at every scale of a schedule; the decoder maps a
latent (B, d, h, w) back to pixels. Only the decoder runs during generation; the encoder serves the
round trip (image -> bits -> image) and teacher forcing.

Module and parameter names follow upstream's `AutoEncoder`, including its wrapper modules (`*.conv.` around
each nn.Conv2d, `*.norm.` around each nn.GroupNorm), so upstream checkpoints load strictly. Checkpoints
saved without those wrapper segments are renamed by `FLAT_KEY_RULES`.

The forward code mirrors upstream's op order exactly (x * sigmoid(x) rather than F.silu, explicit
right/bottom padding before strided convolutions, nearest upsampling), because the golden fixtures
are matched bit for bit.

Uses config.py (value checks, JSON reading). sampling.py calls part 1 to turn generated bits into the
latent; loading/checkpoint.py (`load_vae`) builds the autoencoder; pipeline.py decodes with it.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_int, read_json_object


# =============================================================================================
# Part 1. Binary spherical quantisation (BSQ) over a pyramid of scales
#
# A latent vector of d channels is quantised to d bits: each channel becomes +-1/sqrt(d) by its sign
# after the vector is L2-normalised, so every code lies on the unit sphere. Infinity stacks this as
# residual quantisation over scales: scale si sees the residual area-downsampled to its grid, and its
# codes are trilinearly upsampled back to the final grid, subtracted from the residual and added to the
# running sum `z`. The transformer predicts those bits scale by scale and rebuilds the same sum.
#
# Every operation below mirrors upstream's op order and memory layout, because the golden fixtures are
# matched bit for bit: the layout decides the summation order of norms and of the interpolations.
#
# Shapes: B batch, d bits, t (always 1 for images) x h x w the grid of one scale, T x H x W the final grid.
# =============================================================================================

UP_MODE = "trilinear"  # codes of a coarse scale -> final grid, and the running sum -> next grid
DOWN_MODE = "area"  # residual -> the grid of the scale being quantised

Scale = tuple[int, int, int]  # (t, h, w)


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
    s = 1 / math.sqrt(bits.shape[-1])  # a Python float (float64) like upstream's; torch rounds it when multiplying
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
    return (z.squeeze(2) if z.shape[2] == 1 else z), bits_list, next_inputs  # z (B, d, H, W) for images


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
    return bits_Bhwd.unsqueeze(1)  # (B, 1, h', w', d')


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


# =============================================================================================
# Part 2. The autoencoder
# =============================================================================================

@dataclass(frozen=True)
class VAEConfig:
    codebook_dim: int = 32  # d: bits per latent position (= latent channels)
    base_ch: int = 128
    num_res_blocks: int = 2  # per encoder level; decoder levels have one more
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)  # channel multiplier per level, encoder and decoder
    patch_size: int = 16  # pixels per latent position along each side

    def __post_init__(self):
        check_int("codebook_dim", self.codebook_dim, 1, 63)  # bit codes are packed into int64
        check_int("base_ch", self.base_ch, 1, 8192)
        check_int("num_res_blocks", self.num_res_blocks, 0, 64)
        if not isinstance(self.ch_mult, tuple) or not 1 <= len(self.ch_mult) <= 12:
            raise ValueError(f"ch_mult={self.ch_mult!r} is invalid: it must be a list of 1 to 12 integers")
        for m in self.ch_mult:
            check_int("a ch_mult entry", m, 1, 64)
        check_int("patch_size", self.patch_size, 1, 2 ** (len(self.ch_mult) - 1))
        if self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size={self.patch_size} is invalid: it must be a power of 2")
        for m in self.ch_mult:
            if (self.base_ch * m) % 32 and (self.base_ch * m) % 24:
                raise ValueError(f"base_ch={self.base_ch} x ch_mult {m} = {self.base_ch * m} channels is invalid: "
                                 "GroupNorm needs a multiple of 32 or 24")

    @property
    def n_resample(self) -> int:
        """Number of 2x down- (encoder) and up-sampling (decoder) steps."""
        return int(math.log2(self.patch_size))

    @classmethod
    def from_upstream_json(cls, src: str | Path | dict[str, Any]) -> VAEConfig:
        """Read upstream's VAE arguments: a `vae_config.json` (fields `autoencoder_args` and/or
        `vae_model_call`, as in the fixtures), or a dict with the same fields or the bare namespace.
        Wrong types or values raise one ValueError that names the file and the field."""
        where = "VAE config" if isinstance(src, dict) else f"VAE config {src}"
        raw = src if isinstance(src, dict) else read_json_object(Path(src), "VAE config")
        args: dict[str, Any] = {"base_ch": 128, "num_res_blocks": 2}  # hard-coded in upstream's vae_model()
        args.update({k: v for k, v in raw.items() if not isinstance(v, dict)})
        for key in ("vae_model_call", "autoencoder_args"):
            if not isinstance(raw.get(key, {}), dict):
                raise ValueError(f"{where}: {key} must be a JSON object, got {type(raw[key]).__name__}")
            args.update(raw.get(key, {}))
        if "codebook_dim" not in args and "vae_type" in args:
            args["codebook_dim"] = args["vae_type"]  # Infinity's name for the bit count
        missing = [k for k in ("codebook_dim", "encoder_ch_mult", "patch_size") if k not in args]
        try:
            if missing:
                raise ValueError(f"missing {missing}")
            mult = args["encoder_ch_mult"]
            cfg = cls(codebook_dim=args["codebook_dim"], base_ch=args["base_ch"], num_res_blocks=args["num_res_blocks"],
                      ch_mult=tuple(mult) if isinstance(mult, list) else mult, patch_size=args["patch_size"])
            _check_supported(args)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return cfg


VAE_PRESETS: dict[str, VAEConfig] = {
    # Infinity-2B's VAE (infinity_vae_d32reg.pth): 110,118,051 parameters
    "d32": VAEConfig(codebook_dim=32, base_ch=128, num_res_blocks=2, ch_mult=(1, 2, 4, 4, 4), patch_size=16),
    # Infinity-8B's VAE (infinity_vae_d56_f8_14_patchify.pth; 14 bits x 2x2 patchify = 56): 81,624,209
    "d56": VAEConfig(codebook_dim=14, base_ch=128, num_res_blocks=2, ch_mult=(1, 2, 4, 4), patch_size=8),
}

# Upstream arguments that would change the inference path, and the only value minivar implements.
_SUPPORTED_UPSTREAM = {
    "quantizer_type": "MultiScaleBSQ", "use_vae": False, "cnn_type": "2d", "cnn_attention": "no",
    "cnn_norm_axis": "spatial", "norm_type": "group", "use_pxsf": False, "use_freq_dec": False,
    "new_quant": True, "ln_before_quant": False, "use_decay_factor": False, "random_flip": False,
    "random_flip_1lvl": False, "drop_when_test": False,
}


def _check_supported(args: dict[str, Any]) -> None:
    """Upstream options minivar does not implement (run after VAEConfig checked the numbers)."""
    bad = [f"{k}={args[k]!r} (need {v!r})" for k, v in _SUPPORTED_UPSTREAM.items() if k in args and args[k] != v]
    enc_mult = list(args["encoder_ch_mult"])
    if args.get("decoder_ch_mult", enc_mult) != enc_mult:
        bad.append("decoder_ch_mult != encoder_ch_mult")
    if "codebook_size" in args and args["codebook_size"] != 2 ** int(args.get("codebook_dim", 0)):
        bad.append(f"codebook_size={args['codebook_size']} != 2**codebook_dim (needs a projection)")
    if bad:
        raise ValueError(f"unsupported upstream VAE options: {bad}")


# ---------------------------------------------------------------------------------------------
# building blocks


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)  # upstream's form; F.silu rounds differently


def _groups(ch: int) -> int:
    # Upstream's rule: 32 groups when possible, else 24 (the tiny test VAE has 24/48-channel levels).
    if ch % 32 == 0:
        return 32
    if ch % 24 == 0:
        return 24
    raise ValueError(f"GroupNorm over {ch} channels: not divisible by 32 or 24")


class Norm(nn.Sequential):
    """GroupNorm (eps 1e-6) kept under the attribute `norm`, so keys read `*.norm.weight` as upstream's."""

    def __init__(self, ch: int):
        super().__init__(OrderedDict(norm=nn.GroupNorm(_groups(ch), ch, eps=1e-6)))


class Conv(nn.Sequential):
    """nn.Conv2d kept under the attribute `conv`, so keys read `*.conv.weight` as upstream's."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__(OrderedDict(conv=nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)))


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = Norm(c_in)
        self.conv1 = Conv(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(c_out)
        self.conv2 = Conv(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = Conv(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # Pad right and bottom only: torch convs pad symmetrically, the stride-2 window wants (0, 1).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Sequential):
    """2x nearest-neighbour upsampling, then a 3x3 conv (keys `*.upsample.conv.conv.*`)."""

    def __init__(self, ch: int):
        super().__init__(OrderedDict(nearest=nn.Upsample(scale_factor=2, mode="nearest"),
                                     conv=Conv(ch, ch, 3, padding=1)))


class Level(nn.Sequential):
    """One resolution: `n_blocks` residual blocks, then optionally a 2x down- or up-sampling."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, resample: str | None = None):
        layers = OrderedDict(block=nn.Sequential(*(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks))))
        if resample == "down":
            layers["downsample"] = Downsample(c_out)
        elif resample == "up":
            layers["upsample"] = Upsample(c_out)
        super().__init__(layers)


class Mid(nn.Sequential):
    """Two residual blocks at the lowest resolution (upstream's optional attention is off)."""

    def __init__(self, ch: int):
        super().__init__(OrderedDict(block_1=ResnetBlock(ch, ch), block_2=ResnetBlock(ch, ch)))


# ---------------------------------------------------------------------------------------------
# encoder, decoder, autoencoder


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.ch_mult
        widths_in = [ch * m for m in (1, *mult[:-1])]
        self.conv_in = Conv(3, ch, 3, padding=1)
        # The first n_resample levels end with a stride-2 conv: 2^n_resample = patch_size.
        self.down = nn.ModuleList(
            Level(widths_in[i], ch * mult[i], cfg.num_res_blocks, "down" if i < cfg.n_resample else None)
            for i in range(len(mult)))
        self.mid = Mid(ch * mult[-1])
        self.norm_out = Norm(ch * mult[-1])
        self.conv_out = Conv(ch * mult[-1], cfg.codebook_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> h (B, d, H/p, W/p)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.ch_mult
        widths_in = [ch * m for m in (*mult[1:], mult[-1])]  # level i is fed by level i+1
        self.conv_in = Conv(cfg.codebook_dim, ch * mult[-1], 3, padding=1)
        self.mid = Mid(ch * mult[-1])
        # up[i] runs from the last index down to 0; levels 1..n_resample end with a 2x upsampling.
        self.up = nn.ModuleList(
            Level(widths_in[i], ch * mult[i], cfg.num_res_blocks + 1,
                  "up" if 1 <= i <= cfg.n_resample else None)
            for i in range(len(mult)))
        self.norm_out = Norm(ch * mult[0])
        self.conv_out = Conv(ch * mult[0], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """z (B, d, h, w) -> x (B, 3, p*h, p*w), not clamped."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class BSQVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.d = cfg.codebook_dim
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = MultiScaleBSQ(cfg.codebook_dim)
        self.quantize = self.quantizer  # upstream's alias: checkpoints store the buffer under both names

    def encode(self, img: Tensor) -> Tensor:
        """img (B, 3, H, W) in [-1, 1], H and W multiples of patch_size -> h (B, d, H/p, W/p) float32."""
        p = self.cfg.patch_size
        if img.ndim != 4 or img.shape[1] != 3 or img.shape[2] % p or img.shape[3] % p:
            raise ValueError(f"expected images (B, 3, H, W) with H, W multiples of {p}, got {tuple(img.shape)}")
        return self.encoder(img.to(self.encoder.conv_in.conv.weight.dtype)).float()

    def decode(self, z: Tensor, tiled: bool | None = None) -> Tensor:
        """z (B, d, h, w) -> image (B, 3, p*h, p*w) clamped to [-1, 1].

        The memory layout of z is kept: upstream decodes the generated latent channels-last.
        `tiled` streams the decoder over row bands (`decode_in_bands`: same image up to float
        rounding, a fraction of the memory); None chooses it for images above TILE_ABOVE pixels.
        """
        if z.ndim != 4 or z.shape[1] != self.d:
            raise ValueError(f"expected a latent (B, {self.d}, h, w), got {tuple(z.shape)}")
        z = z.to(self.decoder.conv_in.conv.weight.dtype)
        if use_bands(z.shape[2] * z.shape[3] * self.cfg.patch_size**2, tiled):
            # one image at a time: the bands of one image already bound the memory
            x = torch.cat([decode_in_bands(self.decoder, z[i : i + 1]) for i in range(z.shape[0])])
        else:
            x = self.decoder(z)
        return torch.clamp(x, min=-1, max=1)

    def encode_to_bits(self, img: Tensor, scales: list[Scale]) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Round trip's first half: (h (B, d, H/p, W/p), z (B, d, H/p, W/p), bits per scale
        (B, 1, h, w, d) int64, next-scale inputs (B, d, 1, h', w') for every scale but the last)."""
        h = self.encode(img)
        z, bits, next_inputs = self.quantizer(h, scales)
        return h, z, bits, next_inputs


# ---------------------------------------------------------------------------------------------
# decoding in row bands
#
# The decoder's last levels hold feature maps of 128-512 channels at full resolution: several GiB at
# 1024x1024, four times as much at 2048x2048. Its convolutions are local, but every GroupNorm needs
# the statistics of a whole map, so a band of the image cannot be decoded on its own. Instead each
# map is produced band by band and its GroupNorm statistics are merged from its bands before the next
# pass normalises it. A residual block makes two passes over the bands (conv1, then conv2 plus the
# residual); only its input and conv1's output are stored whole, while the normalised and activated
# copies exist for one band at a time. A 3x3 convolution reads one halo row above and below its band,
# so no output is computed twice. The result equals the whole-map decode up to float rounding (the
# statistics are summed in another order). It is in fact the closer of the two to a float64 decode:
# on the test VAE ATen's channels-last GroupNorm is off by 1e-5 of the scale, the merged statistics
# by 5e-8. They are merged in float32 on the map's device: a float64 merge (CPU only, since MPS has
# none) measured no closer, about 5e-7 of the largest output either way on maps of the test VAE's sizes.

TILE_ABOVE = 512 * 512  # output pixels above which BSQVAE.decode decodes in bands by default


def use_bands(pixels: int, tiled: bool | None) -> bool:
    """Whether BSQVAE.decode(tiled=...) decodes an image of `pixels` output pixels in bands."""
    return pixels > TILE_ABOVE if tiled is None else tiled


BAND_ELEMS = 1 << 24    # input elements (channels x rows x width) per band: 64 MiB in float32


class GroupMoments:
    """GroupNorm statistics of a map that is produced band by band.

    Each band adds its per-channel means and variances, in float32 whatever the map's dtype; `affine`
    merges them with the parallel-variance formula into the mean and variance of each group over the
    whole map. Everything stays on the map's device, in a dtype every device has (MPS has no float64).
    """

    def __init__(self):
        self.parts: list[tuple[int, Tensor, Tensor]] = []  # (values per channel, mean (C,), var (C,))

    def add(self, band: Tensor) -> None:
        n = band[:, 0].numel()
        # two plain passes (5x faster than var_mean here), accumulated in float32 even for bf16 maps
        mean = band.sum((0, 2, 3), keepdim=True, dtype=torch.float32) / n
        var = (band - mean).square_().sum((0, 2, 3)) / n
        self.parts.append((n, mean.flatten(), var))  # mean (1, C, 1, 1) -> (C,)

    def affine(self, norm: Norm) -> tuple[Tensor, Tensor]:
        """Per-channel a, b (1, C, 1, 1) such that norm(x) = x * a + b on the whole map."""
        gn = norm.norm
        mean = torch.stack([p[1] for p in self.parts]).unflatten(1, (gn.num_groups, -1))  # (P, G, C/G)
        var = torch.stack([p[2] for p in self.parts]).unflatten(1, (gn.num_groups, -1))  # (P, G, C/G)
        total = sum(p[0] for p in self.parts) * mean.shape[2]                # values per group
        share = torch.tensor([p[0] / total for p in self.parts], dtype=mean.dtype, device=mean.device)
        share = share[:, None, None]                                          # (P, 1, 1): weight of each part
        mu = (share * mean).sum((0, 2), keepdim=True)                         # (1, G, 1)
        rstd = ((share * (var + (mean - mu) ** 2)).sum((0, 2), keepdim=True) + gn.eps).rsqrt()
        a = gn.weight.float() * rstd.expand_as(mean[:1]).flatten()            # (C,)
        b = gn.bias.float() - mu.expand_as(mean[:1]).flatten() * a            # (C,)
        return a.to(gn.weight.dtype).view(1, -1, 1, 1), b.to(gn.weight.dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)


def norm_swish(norm: Norm, moments: GroupMoments) -> Callable[[Tensor], Tensor]:
    """x -> swish(norm(x)) for bands of the map that `moments` describes. F.silu in place: one pass
    instead of three; it rounds differently from x * sigmoid(x), which only bit parity cares about."""
    a, b = moments.affine(norm)
    return lambda x: F.silu(torch.addcmul(b, x, a), inplace=True)


def bands(rows: int, per_band: int) -> list[tuple[int, int]]:
    return [(r, min(r + per_band, rows)) for r in range(0, rows, per_band)]


def band_rows(x: Tensor) -> int:
    """Rows per band of a map x (1, C, H, W)."""
    return max(1, BAND_ELEMS // (x.shape[1] * x.shape[3]))


def new_map(like: Tensor, channels: int, rows: int, cols: int) -> Tensor:
    return torch.empty(1, channels, rows, cols, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


def conv_rows(conv: Conv, rows: Callable[[int, int], Tensor], r0: int, r1: int, height: int) -> Tensor:
    """Output rows r0:r1 of a 3x3, stride-1, padding-1 conv over an input of `height` rows, where
    `rows(a, b)` makes input rows a:b (the band and one halo row on each side inside the image)."""
    a, b = max(r0 - 1, 0), min(r1 + 1, height)
    w, bias = conv.conv.weight, conv.conv.bias
    if (a, b) == (r0 - 1, r1 + 1):
        return F.conv2d(rows(a, b), w, bias, padding=(0, 1))
    # A band at the image's edge: the conv's own zero padding, minus a row computed past the band.
    return F.conv2d(rows(a, b), w, bias, padding=1)[:, :, r0 - a : r1 - a]


def block_in_bands(block: ResnetBlock, x: Tensor, mx: GroupMoments) -> tuple[Tensor, GroupMoments]:
    """ResnetBlock on x (1, C, H, W) whose statistics are mx -> (output, its statistics).

    Without a channel change the output overwrites x: each band's residual is read just before.
    """
    H, W = x.shape[2:]
    c_out, rows = block.conv1.conv.out_channels, band_rows(x)
    pre1, h, mh = norm_swish(block.norm1, mx), new_map(x, c_out, H, W), GroupMoments()
    for r0, r1 in bands(H, rows):
        h[:, :, r0:r1] = out = conv_rows(block.conv1, lambda a, b: pre1(x[:, :, a:b]), r0, r1, H)
        mh.add(out)
    shortcut = getattr(block, "nin_shortcut", None)
    pre2, my = norm_swish(block.norm2, mh), GroupMoments()
    y = x if shortcut is None else new_map(x, c_out, H, W)
    for r0, r1 in bands(H, rows):
        res = x[:, :, r0:r1] if shortcut is None else shortcut(x[:, :, r0:r1])
        y[:, :, r0:r1] = out = res + conv_rows(block.conv2, lambda a, b: pre2(h[:, :, a:b]), r0, r1, H)
        my.add(out)
    return y, my


def upsample_in_bands(up: Upsample, x: Tensor) -> tuple[Tensor, GroupMoments]:
    """conv(nearest 2x upsampling of x (1, C, h, w)) -> ((1, C, 2h, 2w), its statistics)."""
    H, W = 2 * x.shape[2], 2 * x.shape[3]
    y, my = new_map(x, x.shape[1], H, W), GroupMoments()

    def upsampled(a: int, b: int) -> Tensor:  # rows a:b of the upsampled map; row r copies x's row r // 2
        t = F.interpolate(x[:, :, a // 2 : (b + 1) // 2], scale_factor=2, mode="nearest")
        return t[:, :, a % 2 : a % 2 + b - a]

    for r0, r1 in bands(H, band_rows(y)):
        y[:, :, r0:r1] = out = conv_rows(up.conv, upsampled, r0, r1, H)
        my.add(out)
    return y, my


def decode_in_bands(decoder: Decoder, z: Tensor) -> Tensor:
    """decoder(z) for one latent z (1, d, h, w), computed a row band at a time -> (1, 3, p*h, p*w)."""
    x = decoder.conv_in(z).contiguous(memory_format=torch.channels_last)
    mx = GroupMoments()
    mx.add(x)
    stages: list[nn.Module] = [decoder.mid.block_1, decoder.mid.block_2]
    for level in reversed(decoder.up):
        stages += [*level.block, *([level.upsample] if hasattr(level, "upsample") else [])]
    for stage in stages:
        x, mx = upsample_in_bands(stage, x) if isinstance(stage, Upsample) else block_in_bands(stage, x, mx)
    H, W = x.shape[2:]
    pre, out = norm_swish(decoder.norm_out, mx), new_map(x, 3, H, W)
    for r0, r1 in bands(H, band_rows(x)):
        out[:, :, r0:r1] = conv_rows(decoder.conv_out, lambda a, b: pre(x[:, :, a:b]), r0, r1, H)
    return out


def banded_decode_bytes(cfg: VAEConfig, h: int, w: int, itemsize: int = 4) -> int:
    """Peak bytes of `decode_in_bands` for one latent (d, h, w): the maps that a stage keeps whole
    (a block's input, conv1's output and, with a channel change, its output; an upsampling's input
    and output) at the stage that needs most, plus about four bands of temporaries."""
    ch, mult = cfg.base_ch, cfg.ch_mult
    widths_in = [ch * m for m in (*mult[1:], mult[-1])]
    stored = 2 * ch * mult[-1] * h * w  # the mid blocks
    for i in reversed(range(len(mult))):
        c_in, c_out = widths_in[i], ch * mult[i]
        stored = max(stored, (c_in + c_out + (c_out if c_in != c_out else 0)) * h * w)
        if 1 <= i <= cfg.n_resample:
            stored = max(stored, 5 * c_out * h * w)  # input and its 2x upsampled output
            h, w = 2 * h, 2 * w
    return (stored + 4 * BAND_ELEMS) * itemsize


# ---------------------------------------------------------------------------------------------
# images <-> pixels, as upstream converts them


def image_to_pixels(rgb: Tensor) -> Tensor:
    """uint8 RGB (H, W, 3) or (B, H, W, 3) -> (B, 3, H, W) float32 in [-1, 1].

    Upstream's `to_tensor(x) * 2 - 1`, written as x/255 + x/255 - 1 in its op order. The result is
    contiguous NCHW as upstream's: a channels-last input changes the encoder's convolutions enough to
    flip bits of the round trip.
    """
    x = (rgb.unsqueeze(0) if rgb.ndim == 3 else rgb).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
    x = x.to(torch.float32).div(255)
    return x.add(x).add_(-1)


def pixels_to_image(x: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 RGB (B, H, W, 3), truncating ((x + 1) / 2 * 255) like upstream."""
    return ((x + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8)  # (B, H, W, 3)


# ---------------------------------------------------------------------------------------------
# checkpoint key names

# Checkpoints saved without upstream's wrapper modules ("flat" keys, e.g. `encoder.conv_in.weight`)
# get the `.conv.` / `.norm.` segments back. Keys that already have them match none of the patterns.
FLAT_KEY_RULES: list[tuple[str, str]] = [
    (r"\.(conv_in|conv_out|conv1|conv2|nin_shortcut)\.(weight|bias)$", r".\1.conv.\2"),
    (r"\.(downsample|upsample)\.conv\.(weight|bias)$", r".\1.conv.conv.\2"),
    (r"\.(norm1|norm2|norm_out)\.(weight|bias)$", r".\1.norm.\2"),
]
