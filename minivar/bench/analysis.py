"""Tools for looking inside a generation: spectra of latents and images, and attention maps.

FastVAR's argument rests on three observations about VAR models (arXiv 2503.23367):
  1. the large scales dominate the latency;
  2. the large scales mostly add high-frequency detail, while low frequencies settle early;
  3. a token attends strongly to the same position at the previous scale.
The functions here measure 2 and 3 on a real run; the notebooks only call them and plot.
`low_band_changes` and `stage_profile` measure where StageVAR's stages (`pruning.stages`) fall on a model.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from ..model.pruning import ScaleRecord
from ..model.transformer import ATTENTION_PROBES, Infinity


def radial_power_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially averaged power spectrum of maps x (..., H, W), averaged over all leading dims.

    Returns (freq, power): freq[r] = r cycles per image side, for r = 0 .. min(H, W) // 2, and the
    power spectral density |FFT|^2 / (H W) averaged over the frequencies whose radius rounds to r.
    With this normalisation white noise of variance s^2 is flat at s^2, and a constant map c has
    c^2 H W at r = 0 and nothing elsewhere.
    """
    H, W = x.shape[-2:]
    power = torch.fft.fft2(x.double()).abs().pow(2).reshape(-1, H, W).mean(0) / (H * W)  # (H, W)
    fy = torch.fft.fftfreq(H, d=1.0 / H, dtype=torch.float64)[:, None]   # cycles per image height
    fx = torch.fft.fftfreq(W, d=1.0 / W, dtype=torch.float64)[None, :]
    radius = torch.sqrt(fy**2 + (fx * H / W) ** 2).round().long()       # in cycles per image side
    n = min(H, W) // 2 + 1
    keep = radius < n
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, radius[keep], power[keep])
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, radius[keep], torch.ones_like(power[keep]))
    return torch.arange(n, dtype=torch.float64), total / count.clamp_min(1)


def band_energy(x: torch.Tensor, cutoff: float = 0.25) -> tuple[float, float]:
    """Mean energy of maps x (..., H, W) below and above `cutoff` times the Nyquist radius; the two
    add up to mean(x^2) (Parseval)."""
    H, W = x.shape[-2:]
    power = torch.fft.fft2(x.double()).abs().pow(2).reshape(-1, H, W).mean(0) / (H * W) ** 2
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]               # cycles per pixel
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    low = torch.sqrt(fy**2 + fx**2) <= cutoff * 0.5
    return float(power[low].sum()), float(power[~low].sum())


def low_band_changes(maps: list[torch.Tensor], cutoff: float = 0.25) -> tuple[list[float], list[float]]:
    """How a sequence of maps (..., H, W), e.g. the decoded image after each scale, builds the last map's
    low-frequency band (below `cutoff` times Nyquist, `band_energy`). Per step s, as shares of the last
    map's low-band energy:

        change[s]   low-band energy of maps[s] - maps[s-1] (maps[-1] = 0): what step s moves there
        settled[s]  1 - low-band energy of last - maps[s]: how much of the final low band is in place

    A semantic scale changes the low band a lot, a refinement scale barely (StageVAR's observation).
    """
    final = band_energy(maps[-1], cutoff)[0]
    prev = [torch.zeros_like(maps[0]), *maps[:-1]]
    change = [band_energy(m - p, cutoff)[0] / final for m, p in zip(maps, prev)]
    settled = [1 - band_energy(maps[-1] - m, cutoff)[0] / final for m in maps]
    return change, settled


def stage_profile(pipe, prompts: list[str], seeds: list[int], cutoff: float = 0.25, **kwargs) -> dict:
    """`low_band_changes` of the decoded image after every scale (the running latent sum of the trace,
    decoded), averaged over prompts x seeds, beside each scale's stage by the share rule.

    Returns {"scales", "stages", "change", "settled"} with one entry per scale that ran.
    """
    change, settled, out = [], [], None
    for prompt in prompts:
        for seed in seeds:
            out = pipe.generate(prompt, seed=seed, trace=True, output_type="latent", **kwargs)
            images = [image_pixels(pipe, summed) for summed in out.trace.summed]
            c, s = low_band_changes(images, cutoff)
            change.append(c)
            settled.append(s)
    return {"scales": out.trace.scales, "stages": out.trace.stage,
            "change": np.mean(change, axis=0).tolist(), "settled": np.mean(settled, axis=0).tolist()}


def image_pixels(pipe, summed_BdHW: torch.Tensor) -> torch.Tensor:
    """A latent sum (B, d, H, W) decoded to pixels (B, 3, H', W') in [-1, 1], float64."""
    with torch.no_grad():
        return pipe.vae.decode(summed_BdHW.to(pipe.device)).double().clamp(-1, 1).cpu()


def relative_change(spectra: list[torch.Tensor]) -> torch.Tensor:
    """|P_{s+1} - P_s| / P_s per frequency, for consecutive spectra -> (len - 1, n_freq)."""
    p = torch.stack(spectra)
    return (p[1:] - p[:-1]).abs() / p[:-1].clamp_min(1e-30)


def change_spectra(maps: list[torch.Tensor], reference: torch.Tensor | None = None) -> torch.Tensor:
    """How much each step of a sequence of maps (..., H, W) changes each frequency: the radial power
    spectrum of maps[s+1] - maps[s] over that of `reference` (default: the last map) -> (len - 1, n_freq).

    Unlike `relative_change` this sees content that moves without changing its energy, and it stays
    finite where an early map has no power at all (a coarse scale upsampled to a fine grid).
    """
    ref = radial_power_spectrum(maps[-1] if reference is None else reference)[1]
    steps = [radial_power_spectrum(b - a)[1] for a, b in zip(maps[:-1], maps[1:])]
    return torch.stack(steps) / ref.clamp_min(1e-30)


def resize_to(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bring maps (B, C, h, w) to a common grid, the way the latent sum does (bilinear upsampling)."""
    if tuple(maps.shape[-2:]) == tuple(hw):
        return maps
    return torch.nn.functional.interpolate(maps.double(), size=hw, mode="bilinear", align_corners=False)


def band_average(values: torch.Tensor, freq: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """Mean of per-frequency values (..., n_freq) inside each radial band [edges[i], edges[i+1])
    -> (..., len(edges) - 1)."""
    return torch.stack([values[..., (freq >= lo) & (freq < hi)].mean(-1) for lo, hi in zip(edges[:-1], edges[1:])], -1)


def token_maps(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Tokens (B, h*w, C) in raster order -> maps (B, C, h, w)."""
    return x.reshape(x.shape[0], *hw, x.shape[-1]).permute(0, 3, 1, 2)  # (B, C, h, w)


@contextmanager
def capture_hidden(model: Infinity, layers: list[int]):
    """Record the output of some blocks, one entry per scale that runs.

    Yields a dict layer -> list of (rows, L, C) float32 hidden states (rows: 2B with CFG, conditional
    images first). The forward hooks exist only inside this block.
    """
    states: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    hooks = [model.blocks[li].register_forward_hook(lambda mod, args, out, li=li: states[li].append(out.float().cpu()))
             for li in layers]
    try:
        yield states
    finally:
        for h in hooks:
            h.remove()


def pca_rgb(maps: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    """Show d-channel maps (B, d, H, W) as colours: their projection on the three main directions of
    `ref` (default: the maps themselves), scaled so that ref spans [0, 1] -> (B, H, W, 3) in [0, 1].

    Projecting every scale on the basis of the final latent keeps colours comparable across scales.
    """
    ref = maps if ref is None else ref
    flat = ref.double().permute(0, 2, 3, 1).reshape(-1, ref.shape[1])          # (N, d)
    mean = flat.mean(0)
    basis = torch.linalg.svd(flat - mean, full_matrices=False).Vh[:3].T       # (d, 3)
    ref_proj = (flat - mean) @ basis
    lo, hi = ref_proj.amin(0), ref_proj.amax(0)
    proj = (maps.double().permute(0, 2, 3, 1) - mean) @ basis                 # (B, H, W, 3)
    return ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def bit_entropy(logits: torch.Tensor) -> float:
    """Mean entropy, in bits, of the sampling distribution of every bit; logits (..., 2) as in
    `Trace.logits`. 1 is a coin flip, 0 a certain bit."""
    p = logits.double().softmax(-1)
    return float(-(p * torch.log2(p.clamp_min(1e-300))).sum(-1).mean())


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (PIL or arrays); inf when equal."""
    x, y = (torch.tensor(np.asarray(im), dtype=torch.float64) for im in (a, b))
    mse = float((x - y).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@contextmanager
def capture_attention(model: Infinity, layers: list[int], rows: int | None = None):
    """Record self-attention probabilities of some layers, one entry per scale that runs.

    Yields a dict layer -> list of (R, Lq, Lk) head-averaged probabilities, where R is `rows` (the
    first batch rows: the conditional images come first) or every row. The keys are every cached
    token of earlier scales, then the scale's own. Heads are averaged one at a time, so the probe
    never holds more than one head's (R, Lq, Lk) map: at 1024 px on Infinity-2B that is 0.35 GB
    instead of 5.5 GB for all heads at once. The probe is off outside this block and in other threads
    (`transformer.ATTENTION_PROBES` is a context variable); when off the attention path is one lookup.
    """
    maps: dict[int, list[torch.Tensor]] = {li: [] for li in layers}

    def probe(li):
        def record(q: torch.Tensor, k: torch.Tensor) -> None:
            q, k = q[:rows].float(), k[:rows].float()              # (R, H, Lq, hd), (R, H, Lk, hd)
            mean = sum(torch.softmax(q[:, h] @ k[:, h].transpose(-1, -2), dim=-1)  # (R, Lq, Lk), scale 1
                       for h in range(q.shape[1])) / q.shape[1]
            maps[li].append(mean.cpu())
        return record

    token = ATTENTION_PROBES.set({model.blocks[li].sa: probe(li) for li in layers})
    try:
        yield maps
    finally:
        ATTENTION_PROBES.reset(token)


def previous_scale_attention(p: torch.Tensor, scales: list[tuple[int, int]], si: int) -> torch.Tensor:
    """The block of probabilities p (Lq, Lk) of scale si that falls on the previous scale's tokens:
    (h * w queries, h_prev * w_prev keys)."""
    start = sum(h * w for h, w in scales[: si - 1])
    hp, wp = scales[si - 1]
    return p[:, start : start + hp * wp]


def diagonal_strength(block: torch.Tensor, hw: tuple[int, int], hw_prev: tuple[int, int]) -> float:
    """Share of a query's previous-scale attention that lands on the previous-scale cell covering the
    query's own position (FastVAR's "diagonal" correlation), averaged over queries."""
    h, w = hw
    hp, wp = hw_prev
    iy = torch.arange(h).repeat_interleave(w) * hp // h
    ix = torch.arange(w).repeat(h) * wp // w
    own = block[torch.arange(h * w), iy * wp + ix]
    return float((own / block.sum(-1).clamp_min(1e-30)).mean())


def offset_attention(block: torch.Tensor, hw: tuple[int, int], hw_prev: tuple[int, int], radius: int = 2) -> torch.Tensor:
    """Previous-scale attention by the key's offset from the query's own cell (the cell covering its
    position, as in `diagonal_strength`): (2r+1, 2r+1) mean share of a query's previous-scale
    attention that lands at offset (dy, dx), over the queries for which that cell exists."""
    h, w = hw
    hp, wp = hw_prev
    share = block / block.sum(-1, keepdim=True).clamp_min(1e-30)          # (h*w, hp*wp)
    iy = torch.arange(h).repeat_interleave(w) * hp // h                    # own cell of each query
    ix = torch.arange(w).repeat(h) * wp // w
    q = torch.arange(h * w)
    out = torch.zeros(2 * radius + 1, 2 * radius + 1, dtype=torch.float64)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ky, kx = iy + dy, ix + dx
            ok = (ky >= 0) & (ky < hp) & (kx >= 0) & (kx < wp)
            if ok.any():
                out[dy + radius, dx + radius] = share[q[ok], (ky * wp + kx)[ok]].double().mean()
    return out


def computed_fraction(record: ScaleRecord, hw: tuple[int, int]) -> torch.Tensor:
    """Share of the recorded (layer, sub-layer) steps of a pruned scale in which each token was
    computed rather than restored from the cache scale -> (B, h, w)."""
    keeps = list(record.keep.values())
    counts = torch.zeros(keeps[0].shape[0], hw[0] * hw[1])
    for keep in keeps:
        counts.scatter_add_(1, keep, torch.ones(keep.shape))
    return (counts / len(keeps)).reshape(-1, *hw)
