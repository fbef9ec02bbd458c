"""Estimate a generation's peak memory before running it, and refuse what cannot fit.

A 2048x2048 image has 16k tokens at its last scale; its KV cache, activations and the VAE decoder's
full-resolution feature maps can exceed the machine. Finding that out by an out-of-memory kill
loses the process, so `check_memory` compares an estimate (in float32, the compute dtype here) with
what the device has available and raises one clear `MemoryError` instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import InfinityConfig
from .pruning import PruneSchedule
from .vae import banded_decode_bytes, use_bands

GiB = 1024**3
F32 = 4


@dataclass
class MemoryEstimate:
    kv_cache: int
    activations: int
    vae_decode: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.activations + self.vae_decode

    def describe(self) -> str:
        parts = dict(kv_cache=self.kv_cache, activations=self.activations, vae_decode=self.vae_decode)
        return ", ".join(f"{k.replace('_', ' ')} {v / GiB:.1f}" for k, v in parts.items())


def kv_cache_bytes(cfg: InfinityConfig, scales, prune: PruneSchedule, rows: int) -> int:
    """Bytes of the preallocated KV caches (see sampling.make_caches: the last scale is not stored)."""
    ran = prune.ran(len(scales))
    tokens = sum(prune.kept(si, li, scales[si][0] * scales[si][1]) for si in ran[:-1] for li in range(cfg.depth))
    return 2 * rows * tokens * cfg.embed_dim * F32


def activation_bytes(cfg: InfinityConfig, scales, prune: PruneSchedule, rows: int, images: int,
                     cfg_stop_scale: int | None = None) -> int:
    """Live tensors of the largest scale that runs: residual stream and sub-layer temporaries, the FFN
    hidden layer, the last scale's joined keys and values, logits, and the restoration cache.

    Past the CFG stop (`PruneSchedule.guidance_stop`) the scale runs on the conditional rows only; the
    restoration cache keeps its full rows (the conditional rows are a view of it)."""
    ran = prune.ran(len(scales))
    big = max(ran, key=lambda si: scales[si][0] * scales[si][1])
    L = scales[big][0] * scales[big][1]
    stop = prune.guidance_stop(cfg_stop_scale)
    run_rows = images if stop is not None and big >= stop else rows
    C, d = cfg.embed_dim, cfg.d_vae
    stream = run_rows * L * (8 * C + 2 * cfg.ffn_hidden)
    kv_total = sum(prune.kept(si, 0, scales[si][0] * scales[si][1]) for si in ran)
    joined = 2 * run_rows * kv_total * C
    logits = 4 * images * L * 2 * d
    cache = 0
    if prune.cache_scale is not None:
        h, w = scales[prune.cache_scale]
        cache = 3 * (prune.layers[1] - prune.layers[0] + 1) * rows * h * w * C
    return (stream + joined + logits + cache) * F32


def vae_decode_bytes(vae_cfg, scales, images: int, patchify: bool, tiled: bool | None = None) -> int:
    """The decoder at full resolution. Whole-map decoding (all images at once) holds the last level's
    first block input and its norm, sigmoid and product temporaries (base_ch * ch_mult[1] channels
    each) and conv1's output; banded decoding (`vae.decode_in_bands`, one image at a time, chosen
    as BSQVAE.decode does when `tiled` is None) holds a few whole maps and a few bands."""
    h, w = scales[-1]
    if patchify:
        h, w = 2 * h, 2 * w  # the 8B's latent grid is twice the transformer's
    pixels = h * w * vae_cfg.patch_size**2
    images_out = 3 * images * pixels * F32
    if use_bands(pixels, tiled):
        return banded_decode_bytes(vae_cfg, h, w, F32) + images_out
    ch = vae_cfg.base_ch
    return images * (4 * ch * vae_cfg.ch_mult[1] + ch * vae_cfg.ch_mult[0]) * pixels * F32 + images_out


def estimate(cfg: InfinityConfig, vae_cfg, scales, prune: PruneSchedule, images: int, cfg_on: bool,
             cfg_stop_scale: int | None = None) -> MemoryEstimate:
    """The KV caches are allocated for every CFG row even with a CFG stop (later scales use a view)."""
    rows = images * (2 if cfg_on else 1)
    return MemoryEstimate(kv_cache_bytes(cfg, scales, prune, rows),
                          activation_bytes(cfg, scales, prune, rows, images, cfg_stop_scale),
                          vae_decode_bytes(vae_cfg, scales, images, cfg.spatial_patchify))


def available_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA's free memory, else the OS's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(est: MemoryEstimate, device: torch.device, what: str) -> None:
    free = available_bytes(device)
    if est.total > free:
        raise MemoryError(f"{what} needs about {est.total / GiB:.1f} GiB ({est.describe()} GiB) but "
                          f"{free / GiB:.1f} GiB is available; use prune=True, a lower res, fewer prompts "
                          "or a larger device")
