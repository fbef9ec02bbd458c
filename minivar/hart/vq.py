"""HART's tokenizer, the parts that decode: VAR's multi-scale residual VQ and its CNN decoder.

A scale's tokens are codebook indices. Their codebook vectors (B, Cvae, pn, pn) are upsampled to the
final grid (bicubic), passed through one of a few shared `Phi` convolutions (a residual mix
(1 - r) h + r conv(h)) and added to the running latent f_hat; the next scale's input is f_hat
area-resized to its grid. The last discrete scale is added as it is, without Phi. The decoder turns
f_hat into pixels (VQGAN's: ResNet blocks, self-attention at the lowest resolution, nearest-neighbour
upsampling). Parameter names follow upstream's `vae.*` keys with the `vae.` prefix removed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import VQConfig


class Phi(nn.Conv2d):
    """(1 - r) h + r conv3x3(h): the residual refinement of an upsampled scale."""

    def __init__(self, C: int, ratio: float):
        super().__init__(C, C, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class Quantizer(nn.Module):
    """The codebook and the K shared Phi convolutions. Scale si of n uses the Phi whose tick (K points
    spread over [0, 1]) lies nearest to si / (n - 1)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = nn.Module()  # upstream's container name, for the checkpoint keys
        self.quant_resi.qresi_ls = nn.ModuleList(Phi(cfg.z_channels, cfg.quant_resi) for _ in range(cfg.share_quant_resi))
        K = cfg.share_quant_resi
        margin = 1 / 3 / K if K == 4 else 1 / 2 / K
        self.ticks = np.linspace(margin, 1 - margin, K)

    def phi(self, si: int, n: int) -> Phi:
        return self.quant_resi.qresi_ls[int(np.argmin(np.abs(self.ticks - si / (n - 1))))]

    def add_scale(self, f_hat: torch.Tensor, h: torch.Tensor, si: int, n: int) -> torch.Tensor:
        """Add scale si's codes h (B, Cvae, pn, pn) to f_hat (B, Cvae, P, P) in place: upsampled and refined
        by Phi, except at the last scale, which is added as it is."""
        if si == n - 1:
            return f_hat.add_(h)
        return f_hat.add_(self.phi(si, n)(F.interpolate(h, size=f_hat.shape[-2:], mode="bicubic")))


# --------------------------------------------------------------------------------------------------
# VQDecoder
# --------------------------------------------------------------------------------------------------
def group_norm(C: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, C, eps=1e-6)


class VQResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, C: int):
        super().__init__()
        self.norm = group_norm(C)
        self.qkv = nn.Conv2d(C, 3 * C, 1)
        self.proj_out = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)     # 3 x (B, C, HW)
        w = torch.bmm(q.permute(0, 2, 1).contiguous(), k.contiguous()).mul_(C ** -0.5).softmax(dim=2)  # (B, HW, HW)
        h = torch.bmm(v.contiguous(), w.permute(0, 2, 1).contiguous())          # (B, C, HW)
        return x + self.proj_out(h.view(B, C, H, W))


class VQUpsample(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class VQDecoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, n = cfg.ch_mult, cfg.num_res_blocks
        C = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, C, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = VQResnetBlock(C, C), AttnBlock(C), VQResnetBlock(C, C)
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):  # built lowest resolution first, stored in resolution order
            up, cout = nn.Module(), cfg.ch * mult[level]
            up.block = nn.ModuleList(VQResnetBlock(C if i == 0 else cout, cout) for i in range(n + 1))
            up.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n + 1) if level == len(mult) - 1)
            if level != 0:
                up.upsample = VQUpsample(cout)
            self.up.insert(0, up)
            C = cout
        self.norm_out, self.conv_out = group_norm(C), nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Cvae, h, w) -> pixels (B, 3, h * 2^(levels-1), ...), unclamped."""
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                x = block(x)
                x = up.attn[i](x) if len(up.attn) else x
            x = up.upsample(x) if level != 0 else x
        return self.conv_out(F.silu(self.norm_out(x)))


class HartVQ(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.quantize = Quantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, padding=cfg.quant_conv_ks // 2)
        self.decoder = VQDecoder(cfg)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """The latent (B, Cvae, P, P) -> an image (B, 3, H, W) in [0, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1).add_(1).mul_(0.5)
