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

from .model.config import InfinityConfig
from .model.pruning import PruneSchedule
from .model.vae import banded_decode_bytes, use_bands

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


def kv_cache_bytes(cfg: InfinityConfig, scales, prune: PruneSchedule, rows: int, itemsize: int = F32) -> int:
    """Bytes of the preallocated KV caches (see sampling.make_caches: the last scale is not stored),
    `itemsize` bytes per value (2 for bf16 caches)."""
    ran = prune.ran(len(scales))
    tokens = sum(prune.kept(si, li, scales[si][0] * scales[si][1]) for si in ran[:-1] for li in range(cfg.depth))
    return 2 * rows * tokens * cfg.embed_dim * itemsize


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
             cfg_stop_scale: int | None = None, kv_itemsize: int = F32) -> MemoryEstimate:
    """The KV caches are allocated for every CFG row even with a CFG stop (later scales use a view)."""
    rows = images * (2 if cfg_on else 1)
    return MemoryEstimate(kv_cache_bytes(cfg, scales, prune, rows, kv_itemsize),
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


# --------------------------------------------------------------------------------------------------
# Memory-mapped weights. Loading keeps weights in the file's pages (torch.load(mmap=True), safetensors):
# the kernel reads a page on first touch and counts it in the process's RSS from then on. A model that
# is done for this generation (T5 after encoding, the transformer before decoding) can hand its pages
# back: they leave the process but stay in the page cache, so the next touch is a cheap minor fault.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str           # "" for anonymous memory (the heap, torch's allocations)


def mappings() -> list[Mapping]:
    """The process's memory mappings, from /proc/self/maps (empty where there is no /proc)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                start, end = (int(a, 16) for a in fields[0].split("-"))
                path = fields[5].strip() if len(fields) > 5 else ""
                out.append(Mapping(start, end, path if path.startswith("/") else ""))
    except OSError:
        pass
    return out


def mapping_of(t: torch.Tensor, maps: list[Mapping] | None = None) -> Mapping | None:
    """The file mapping that holds t's data, or None (anonymous memory, another device, no /proc)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return None
    ptr = t.untyped_storage().data_ptr()
    hit = next((m for m in maps or mappings() if m.start <= ptr < m.end), None)
    return hit if hit is not None and hit.path else None


def mapping_stats(m: Mapping) -> dict[str, int]:
    """The kB counters /proc/self/smaps gives one mapping (Rss, Anonymous, ...)."""
    stats, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                inside = head == f"{m.start:x}-{m.end:x}"
            elif inside and line.rstrip().endswith("kB"):
                stats[head.rstrip(":")] = int(line.split()[1])
    return stats


def release_mapped(module: torch.nn.Module) -> int:
    """Drop the resident pages of the files `module`'s weights are mapped from; returns the bytes dropped.

    madvise(MADV_DONTNEED) on a private file mapping forgets the process's copy of each page; the
    next read faults it in again from the page cache. A mapping with pages that the process wrote to
    (they are then anonymous copies, e.g. a weight changed in place) is left alone: dropping them
    would silently restore the file's values. Dirty page-cache pages are not such writes: a file
    written or downloaded moments ago stays dirty until the kernel writes it back (smaps counts its
    pages as Private_Dirty), and its pages read back the same, so they are dropped like clean ones
    (keeping them held T5's 4.6 GiB through the scale loop: 11.2 instead of 6.9 GiB at 1024).
    """
    maps = mappings()
    files = {m for t in [*module.parameters(), *module.buffers()] if (m := mapping_of(t, maps)) is not None}
    dropped = 0
    for m in files:
        stats = mapping_stats(m)
        if not stats.get("Anonymous", 1) and drop_pages(m):
            dropped += stats.get("Rss", 0) * 1024
    return dropped


def drop_pages(m: Mapping) -> bool:
    """madvise(MADV_DONTNEED) over a whole mapping. Safe for clean private file pages and for shared
    file mappings (written pages stay in the page cache); it would lose a private mapping's writes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(m.start), ctypes.c_size_t(m.end - m.start), MADV_DONTNEED) == 0


MADV_DONTNEED = 4
