"""Benchmark: wall time, FLOP rate and memory of generations, compared A/B in one process.

    python -m minivar.bench --quick                                     # CI smoke test (tiny-a, < 1 min)
    python -m minivar.bench --subjects infinity-2b-shape --res 1024 --depth 4 --out bench/2b-1024
    python -m minivar.bench --direct --subjects infinity-2b-shape --res 1024 --depth 32 --out bench/direct

Subjects:
    tiny               the golden fixture tests/fixtures/tiny-a: real T5, transformer and VAE
    toy                the toy model shipped in minivar/toy/weights, skipped when it is not there
    infinity-2b-shape  Infinity-2B widths with random weights and --depth layers; random T5-width text
    infinity-8b-shape  the same for Infinity-8B (VAE d56)
    infinity-2b-synthetic  a full-size random checkpoint set in the published formats (about 10 GB,
                       written once under the weights home), run end to end at full depth with real T5,
                       each --res x --prune arm in a fresh process (load, phase times, peak RSS);
                       see synthetic.py. Minutes per arm: never part of --quick or CI.
Shape models build `Infinity` at the real widths with fewer layers (deterministic init), read fixed
random text features instead of T5's (`RandomText`), and decode with a randomly initialised VAE at real
widths unless --no-vae. Their per-layer times are extrapolated to the real depth (`extrapolate`).
--weight-dtype sets the transformer's weight storage: stored (the default, as `minivar.load()` keeps
the files; bf16 for the shape models, as Infinity publishes them), fp32 or bf16 (on CPU the matmuls
still run in float32 on a per-call copy of each weight); --decode pins the
VAE's row-band or whole-map decoding (default auto: what `BSQVAE.decode` picks, bands above 512x512).

Every subject is a `Pipeline`, and every timed generation is one `Pipeline.generate` call: the phase
split (text / transformer / VAE) is its `Output.timings`, per-scale times come from the scale loop's
`progress` hook and per-layer times from forward hooks on the blocks. Nothing else differs from a
user's call: the same allocator (glibc's defaults, unless --keep-heap changes them for the whole run),
the same latent layout, the same decoder path and the conversion to PIL images.

Cases are every combination of --res, --prune and --cfg-stop (--prune: off, on = prune=True, stagevar;
--cfg-stop: off, on = from 1/8 of the final tokens, refine = from the first refinement-stage scale of
`pruning.stages`). The issue-21 arms are `--prune off,on,stagevar --cfg-stop off,refine`: stagevar
carries its own CFG stop, so its cfg-stop@refine case would equal its plain one and is dropped. --res is
Infinity's pixel side, passed to generate as its budget name, so the toy runs the same token grids).
After --warmup untimed rounds, each of --repeats rounds runs every case once, in order (A/B/A/B), so
drifts of a shared machine hit all cases alike. Peak memory is measured afterwards, in one separate
untimed generation per case (RSS sampled every few ms on CPU, torch.cuda.max_memory_allocated on CUDA),
so the sampling thread never runs during a timed generation. Reported per case: median and spread
(min..max) of the total, text / transformer / VAE split and every scale; per-layer times; achieved
GFLOP/s (analytic FLOPs from flops.py) of the transformer against a matmul peak and of the VAE
decoder against a 3x3 convolution peak, both measured in the same process; peak memory per phase;
KV-cache bytes. Output: bench.json, bench.md, bench.png. --direct instead times plain
`Pipeline.generate` calls (no hooks, no memory pass, no peaks) and writes direct.json and direct.md: the
check of the bench's figures.

For a --depth k shape model, prune=True uses the preset computed for depth k, which scales FastVAR's
layer window 3..27 of 32 to round(3k/32)..round(27k/32). The full-depth estimate instead places each
layer of the real model with the real preset (3..27 of 32) and prices it with the measured time of a
layer doing the same work (same scale, tokens, keys and batch rows) anywhere in this run.

Uses pipeline.py (every generation; the KV and restoration cache bytes), flops.py (analytic counts), the
scale plan of model/sampling.py, and synthetic.py (the full-size subject and the fixtures folder).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..loading.files import atomic_write, write_text
from ..model.config import PRESETS, InfinityConfig, budget_for_res, scale_schedule
from .flops import block_count, plan_count, text_tokens_problem, vae_decode_count
from .flops import summary as flop_summary
from ..pipeline import GiB, kv_cache_bytes, restore_cache_bytes
from ..numerics import BF16_UNITS, NUMERICS, prepare as prepare_numerics, cpu_flags, resolve as resolve_numerics
from ..pipeline import Pipeline
from ..pipeline import synchronize as sync
from ..model.pruning import model_stages, resolve_prune
from ..model.pruning import PruneSchedule
from ..model.sampling import Settings, plan
from ..model.transformer import Infinity
from ..model.vae import VAE_PRESETS, BSQVAE, VAEConfig

TINY_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny-a"  # "tiny": in a checkout only
PROMPT = "a red apple on a wooden table"
SHAPE_MODELS = {"infinity-2b-shape": "infinity-2b", "infinity-8b-shape": "infinity-8b"}
SYNTHETIC = "infinity-2b-synthetic"   # real files, real T5, full depth: see synthetic.py
PHASES = ("text", "transformer", "vae")


# --------------------------------------------------------------------------------------------------
# Subjects: a pipeline, whether its VAE decodes, and the real config it stands for
# --------------------------------------------------------------------------------------------------
@dataclass
class Subject:
    name: str
    pipe: Pipeline                # every generation is pipe.generate
    full_cfg: InfinityConfig      # the real config: its depth is what results are extrapolated to
    text_tokens: int
    with_vae: bool = True         # False: generate(output_type="latent"), the VAE phase is empty

    @property
    def model(self) -> Infinity:
        return self.pipe.transformer

    @property
    def vae(self) -> BSQVAE | None:
        return self.pipe.vae if self.with_vae else None

    @property
    def family(self) -> str:
        return self.pipe.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.model.state_dict().values())


class RandomText(nn.Module):
    """Stands in for T5 in the shape models: the same fixed feature rows (n, Ct) for every prompt."""

    def __init__(self, feats: torch.Tensor):
        super().__init__()
        self.register_buffer("feats", feats)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, n) -> features (B, n, Ct)."""
        return self.feats.expand(ids.shape[0], -1, -1)


class FixedLengthTokenizer:
    """Stands in for the T5 tokenizer in the shape models: every prompt is `n` tokens long."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(prompts), self.n)
        return torch.zeros(shape, dtype=torch.long), torch.ones(shape, dtype=torch.long)


def shape_subject(name: str, depth: int | None, with_vae: bool, text_tokens: int = 32, seed: int = 0,
                  weight_dtype: torch.dtype = torch.float32, numerics: str = "reference") -> Subject:
    """Real widths of `name`, `depth` layers, deterministic random weights and text features."""
    full = PRESETS[SHAPE_MODELS[name]]
    vae = VAE_PRESETS["d56" if full.spatial_patchify else "d32"]
    return random_subject(name, SHAPE_MODELS[name], full, depth or full.depth, vae, text_tokens, seed, weight_dtype,
                          with_vae=with_vae, numerics=numerics)


def random_subject(name: str, family: str, full: InfinityConfig, depth: int, vae: VAEConfig | None,
                   text_tokens: int, seed: int = 0, weight_dtype: torch.dtype = torch.float32,
                   with_vae: bool = True, numerics: str = "reference") -> Subject:
    """A pipeline of `Infinity(full)` cut to `depth` layers with seeded random weights, random T5-width
    text features (`RandomText`) and a random VAE of config `vae`.

    `weight_dtype` is the transformer's storage, as `minivar.load(dtype=...)` gives it: every
    floating tensor is cast (bf16 halves the weights). `numerics` (a resolved mode, numerics.py) then
    sets what the math runs in, as `load` does. Without a VAE to decode (`vae` None or not `with_vae`)
    the pipeline gets one on the meta device: generate reads only its config.
    """
    torch.manual_seed(seed)
    model = Infinity(replace(full, depth=depth)).eval().requires_grad_(False).to(weight_dtype)
    decodes = with_vae and vae is not None
    vae = vae or VAEConfig(codebook_dim=full.d_vae // (4 if full.spatial_patchify else 1))
    with torch.device("cpu" if decodes else "meta"):
        decoder = BSQVAE(vae).eval().requires_grad_(False)
    feats = torch.randn(text_tokens, full.text_channels, generator=torch.Generator().manual_seed(seed))
    pipe = Pipeline(model, decoder, RandomText(feats), FixedLengthTokenizer(text_tokens), name=family,
                    numerics=numerics)
    prepare_numerics(numerics, model, decoder if decodes else None, pipe.text_encoder)
    return Subject(name, pipe, full, text_tokens, decodes)


def pipeline_subject(name: str, with_vae: bool, weight_dtype: torch.dtype | None = None,
                     numerics: str = "reference") -> Subject | None:
    """A real pipeline: the tiny-a fixture, or the shipped toy model (None when it is absent)."""
    import minivar

    if name == "tiny":
        t = TINY_DIR
        pipe = minivar.load(transformer=t / "infinity.pth", vae=t / "vae.pth", text_encoder=t / "t5",
                            config=t / "infinity_config.json", vae_config=t / "vae_config.json",
                            dtype=weight_dtype, numerics=numerics)
    else:
        from ..loading.hub import SHIPPED

        if not SHIPPED["toy"].is_dir():
            print(f"skipping toy: {SHIPPED['toy']} does not exist")
            return None
        try:
            pipe = minivar.load("toy", dtype=weight_dtype, numerics=numerics)
        except Exception as e:  # the toy model is optional: report why and go on
            print(f"skipping toy: {type(e).__name__}: {str(e)[:200]}")
            return None
    tokens = pipe.encode_text([PROMPT])[1][0]
    return Subject(name, pipe, pipe.transformer.cfg, tokens, with_vae)


WEIGHT_DTYPES = {"stored": None, "fp32": torch.float32, "bf16": torch.bfloat16}
PUBLISHED_DTYPE = torch.bfloat16      # "stored" for the shape models: Infinity's checkpoints are bf16
DECODE_MODES = {"auto": None, "banded": True, "whole": False}


def make_subject(name: str, args, numerics: str = "auto") -> Subject | None:
    """Subject `name` in `numerics`; with several --numerics arms its name carries the mode (`name@bf16`)."""
    dtype, mode = WEIGHT_DTYPES[args.weight_dtype], resolve_numerics(numerics, args.device)[0]
    label = f"{name}@{mode}" if len(args.numerics) > 1 else name
    if name in SHAPE_MODELS:
        subj = shape_subject(name, args.depth, not args.no_vae, args.text_tokens, weight_dtype=dtype or PUBLISHED_DTYPE,
                             numerics=mode)
    elif name in ("tiny", "toy"):
        subj = pipeline_subject(name, not args.no_vae, dtype, mode)
    else:
        raise ValueError(f"unknown subject {name!r}: choose from tiny, toy, {', '.join(SHAPE_MODELS)}")
    if subj is not None:
        subj.name = label
        pin_decode_mode(subj.pipe.vae, DECODE_MODES[args.decode])
    return subj


def pin_decode_mode(vae: BSQVAE, tiled: bool | None) -> None:
    """--decode banded/whole: every `BSQVAE.decode` call of this instance gets `tiled`. The default (None, auto)
    leaves the method alone, so generate decodes exactly as it does for a user."""
    if tiled is not None:
        vae.decode = functools.partial(BSQVAE.decode, vae, tiled=tiled)


# --------------------------------------------------------------------------------------------------
# Measuring: a scale clock, a layer clock, a peak-memory sampler, matmul and convolution peaks
# --------------------------------------------------------------------------------------------------
class ScaleClock:
    """generate's `progress` hook: stamps the start of every scale that runs, and the loop's end."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, ran: list[int]) -> Iterable[int]:
        for si in ran:
            sync(self.device)
            self.stamps.append(time.perf_counter())
            yield si
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def per_scale(self) -> list[float]:
        """Seconds per scale that ran: blocks, logits, sampling and the next scale's input."""
        return [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:])]


class LayerClock:
    """Forward hooks on every block record (layer, start, end); a layer-0 start opens a new scale."""

    def __init__(self, model: Infinity):
        self.model, self.device = model, next(model.parameters()).device
        self.events: list[tuple[int, float, float]] = []
        self._start = 0.0

    def __enter__(self) -> LayerClock:
        self.handles = []
        for li, block in enumerate(self.model.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda *_: self._begin()))
            self.handles.append(block.register_forward_hook(lambda *_, li=li: self._end(li)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _begin(self) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def _end(self, li: int) -> None:
        sync(self.device)
        self.events.append((li, self._start, time.perf_counter()))

    def per_scale(self) -> list[list[float]]:
        """Seconds per (scale, layer)."""
        layers: list[list[float]] = []
        for li, t0, t1 in self.events:
            if li == 0:
                layers.append([])
            layers[-1].append(t1 - t0)
        return layers


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Give freed heap back to the OS so that RSS peaks of one case do not carry into the next."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory per phase: RSS sampled every `interval` s by a thread on CPU, the allocator on CUDA."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval, self._peak, self._stop = device, interval, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        self._peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def take(self) -> int:
        """The peak since the last call, then start a new phase."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak
        peak, self._peak = max(self._peak, rss_bytes()), rss_bytes()
        return peak


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` timed calls of fn, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(device: torch.device, repeats: int = 3, quick: bool = False) -> dict:
    """Best fp32 GFLOP/s of torch matmuls at the transformer's shapes on this machine, now."""
    shapes = [(1024, 1024, 1024)] if quick else [(2048, 2048, 2048), (8192, 2048, 8192), (4096, 4096, 4096)]
    best = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        best[f"{m}x{k}x{n}"] = 2 * m * k * n / best_seconds(lambda: a @ b, device, repeats) / 1e9
    return {"gflops": max(best.values()), "by_shape": best}


def conv_peak(device: torch.device, repeats: int = 3, quick: bool = False) -> dict:
    """Best fp32 GFLOP/s of one 3x3 convolution shaped like the VAE decoder's: 256 -> 256 channels
    over a 64-row band of a 1024-wide map (a band of `vae.decode_in_bands`), with one halo row on
    each side. `gflops` is the channels-last rate, the layout the decoder computes in; NCHW is listed
    for comparison. On CPU torch hands it to oneDNN, which runs a direct convolution (no Winograd or
    FFT), so the analytic count 2 * 9 * C_in * C_out * rows * width is the work done."""
    c, rows, width = (128, 16, 256) if quick else (256, 64, 1024)
    x = torch.randn(1, c, rows + 2, width, device=device)
    w = torch.randn(c, c, 3, 3, device=device)
    best = {}
    for layout, fmt in (("channels-last", torch.channels_last), ("nchw", torch.contiguous_format)):
        xl = x.contiguous(memory_format=fmt)
        seconds = best_seconds(lambda: F.conv2d(xl, w, padding=(0, 1)), device, repeats)
        best[f"{c}x{c}x3x3 over {rows}x{width} {layout}"] = 2 * 9 * c * c * rows * width / seconds / 1e9
    return {"gflops": next(iter(best.values())), "by_shape": best}


# --------------------------------------------------------------------------------------------------
# One generation
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    subject: str
    res: int
    prune: bool | str         # False, True or a preset word ("stagevar")
    cfg_stop: bool | str      # False, True (`default_cfg_stop`) or "refine" (`refinement_cfg_stop`)

    @property
    def label(self) -> str:
        stop = {False: "", True: " cfg-stop"}.get(self.cfg_stop, f" cfg-stop@{self.cfg_stop}")
        return f"{self.subject} {self.res} prune={ARM_WORDS.get(self.prune, self.prune)}{stop}"


ARM_WORDS = {False: "off", True: "on"}


def default_cfg_stop(scales: list[tuple[int, int]]) -> int:
    """Stage-aware CFG from the first scale with at least 1/8 of the final scale's tokens (24x24 at 1024)."""
    final = scales[-1][0] * scales[-1][1]
    return next(si for si, (h, w) in enumerate(scales) if 8 * h * w >= final)


def refinement_cfg_stop(cfg: InfinityConfig, scales: list[tuple[int, int]]) -> int | None:
    """Stage-aware CFG from the first refinement-stage scale (`pruning.stages`; 32x32 at 1024), as prune="stagevar"."""
    labels = model_stages(cfg, scales)
    return labels.index("refinement") if "refinement" in labels else None


def case_cfg_stop(case: Case, cfg: InfinityConfig, scales: list[tuple[int, int]]) -> int | None:
    if case.cfg_stop == "refine":
        return refinement_cfg_stop(cfg, scales)
    return default_cfg_stop(scales) if case.cfg_stop else None


@dataclass
class CasePlan:
    """What a case computes: schedule, pruning, settings and the analytic counts."""
    scales: list[tuple[int, int]]
    prune: PruneSchedule
    settings: Settings
    counts: list            # flops.ScaleCount per scale that runs
    flops: dict             # flops.summary
    kv_bytes: int
    restore_bytes: int      # pruning's restoration cache (float32 sub-layer outputs), from the plan
    generate_kwargs: dict   # the Pipeline.generate arguments that compute exactly this


def plan_case(subj: Subject, case: Case, cfg: InfinityConfig | None = None) -> CasePlan:
    """The plan for the subject's model, or for `cfg` (the full-depth model) when given."""
    cfg = cfg or subj.model.cfg
    scales = scale_schedule(case.res)
    prune = resolve_prune(case.prune, cfg, scales)
    stop = case_cfg_stop(case, cfg, scales)
    settings = Settings(cfg=3.0, tau=0.5, seed=1, cfg_stop_scale=stop)
    the_plan = plan(cfg, scales, 1.0, settings, prune)
    counts = plan_count(cfg, the_plan, batch=1, text_tokens=subj.text_tokens)
    vae = vae_decode_count(subj.vae.cfg, vae_latent_hw(cfg, scales)) if subj.vae is not None else None
    kwargs = dict(res=budget_for_res(case.res), prune=case.prune, cfg=settings.cfg, tau=settings.tau,
                  top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed, cfg_stop_scale=stop,
                  output_type="pil" if subj.vae is not None else "latent")
    kv_bytes = kv_cache_bytes(the_plan, cfg, rows=2, itemsize=subj.model.kv_dtype.itemsize)
    return CasePlan(scales, prune, settings, counts, flop_summary(counts, vae), kv_bytes,
                    restore_cache_bytes(the_plan, cfg, images=1), kwargs)


def vae_latent_hw(cfg: InfinityConfig, scales) -> tuple[int, int]:
    h, w = scales[-1]
    return (2 * h, 2 * w) if cfg.spatial_patchify else (h, w)


def timed_once(subj: Subject, plan: CasePlan) -> dict:
    """One `Pipeline.generate` call: its own phase split, per-scale and per-layer times."""
    release_memory()  # start from a trimmed heap, as a fresh process does
    scales = ScaleClock(subj.device)
    with LayerClock(subj.model) as layers:
        out = subj.pipe.generate(PROMPT, progress=scales, **plan.generate_kwargs)
    t = out.timings
    return {"total": sum(t[ph] for ph in PHASES), **{ph: t[ph] for ph in PHASES},
            "scales": scales.per_scale(), "layers": layers.per_scale()}


def memory_once(subj: Subject, plan: CasePlan) -> dict:
    """Peak memory of each phase in one untimed `Pipeline.generate` call.

    Phases are cut where the scale loop starts and where generate calls `Pipeline.decode`. Before the
    decoder the freed KV caches are handed back to the OS, so the VAE phase's peak is the decoder's own
    rather than the heap the transformer left behind; with --keep-heap the decoder runs under glibc's
    mmap for large buffers (`system_malloc_for_large_buffers`). Neither happens in a timed call.
    """
    pipe, peaks = subj.pipe, {}
    release_memory()
    base = rss_bytes()
    with PeakMemory(subj.device) as mem:
        def loop_starts(ran: list[int]) -> Iterable[int]:
            peaks["text"] = mem.take()
            yield from ran

        def decode(summed: torch.Tensor):
            peaks["transformer"] = mem.take()
            release_memory()
            mem.take()
            with system_malloc_for_large_buffers():
                return Pipeline.decode(pipe, summed)

        mem.take()
        pipe.decode = decode
        try:
            pipe.generate(PROMPT, progress=loop_starts, **plan.generate_kwargs)
        finally:
            del pipe.decode
        if subj.vae is None:
            peaks["transformer"], peaks["vae"] = mem.take(), 0
        else:
            peaks["vae"] = mem.take()
    return {"rss_before": base, "peak": peaks}


# --------------------------------------------------------------------------------------------------
# Statistics and the full-depth extrapolation
# --------------------------------------------------------------------------------------------------
def stats(values: list[float]) -> dict:
    """Median and spread (min, max, and (max - min) / median) of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "n": len(values)}


def layer_key(sc, li: int) -> tuple[int, int, int, int]:
    """What decides a layer's work at a scale: scale index, tokens computed, keys attended, batch rows."""
    return sc.si, sc.kept[li], sc.kv_len[li], sc.rows


def layer_table(results: list[dict]) -> dict[tuple, list[float]]:
    """Measured seconds of every (scale, tokens, keys, rows) layer in a set of case results."""
    table: dict[tuple, list[float]] = {}
    for r in results:
        for sample in r["samples"]:
            for sc, times in zip(r["plan"].counts, sample["layers"]):
                for li, t in enumerate(times):
                    table.setdefault(layer_key(sc, li), []).append(t)
    return table


def extrapolate(subj: Subject, case: Case, result: dict, table: dict[tuple, list[float]]) -> dict:
    """Time and memory of the real-depth model, from this run's measured layers.

    time: measured time outside the blocks (text, per-scale head/sampling/embedding, VAE), plus for
    every layer of the real model (real prune preset) the median time of a measured layer with the
    same key (`layer_key`); a key never measured is priced by FLOPs from the same scale's layers.
    memory: the measured peak of each phase, plus the difference in weights, KV cache and pruning's
    restoration cache between the real depth and the measured one (these are all that grow with depth).
    """
    full = plan_case(subj, case, subj.full_cfg)
    med = {k: statistics.median(v) for k, v in table.items()}
    samples = result["samples"]
    outside = statistics.median([s["transformer"] - sum(map(sum, s["layers"])) for s in samples])
    layers, by_flops = 0.0, 0
    for sc in full.counts:
        for li in range(subj.full_cfg.depth):
            key = layer_key(sc, li)
            if key in med:
                layers += med[key]
            else:
                layers += flops_priced(subj.full_cfg, sc, li, med, subj.text_tokens)
                by_flops += 1
    text, vae = (statistics.median([s[k] for s in samples]) for k in ("text", "vae"))
    transformer = outside + layers
    return {"depth": subj.full_cfg.depth, "total": text + transformer + vae, "text": text,
            "transformer": transformer, "vae": vae, "layers_priced_by_flops": by_flops,
            "layers": subj.full_cfg.depth * len(full.counts),
            "transformer_flops": full.flops["transformer_flops"], **memory_estimate(subj, result, full)}


def flops_priced(cfg: InfinityConfig, sc, li: int, med: dict, text_tokens: int) -> float:
    """A layer never measured: seconds per FLOP of the measured layers of the same scale and rows."""
    def layer_flops(k, kv, rows):
        return sum(c.flops for c in block_count(cfg, rows, k, kv, text_tokens).values())
    same = [(t, layer_flops(k, kv, rows)) for (si, k, kv, rows), t in med.items() if si == sc.si and rows == sc.rows]
    if not same:
        raise ValueError(f"no measured layer at scale {sc.si} to price a full-depth layer with")
    rate = sum(t for t, _ in same) / sum(f for _, f in same)
    return rate * layer_flops(sc.kept[li], sc.kv_len[li], sc.rows)


def memory_estimate(subj: Subject, result: dict, full: CasePlan) -> dict:
    """Peak memory of the real-depth model, per phase, from the parts that make it up.

    Measured at depth k (medians over the memory passes): the process before generating (`base`, which holds
    the depth-k weights; the rest of it is `other`: torch, the VAE's weights, text features) and
    each phase's peak above it. What grows with depth is replaced by its real-depth size:
        transformer = weights + other + KV cache + restoration cache + activations
        vae         = weights + other + decoder
        text        = weights + other + text
    where activations = transformer peak - base - KV(k) - restoration(k) (it includes the
    per-matmul float32 copy of a bf16 weight), and decoder = VAE peak - base.
    """
    plan, cfg = result["plan"], subj.model.cfg
    itemsize = subj.model.pos_start.element_size()
    w_now, w_full = subj.weight_bytes, subj.full_cfg.param_count() * itemsize
    restore_now, restore_full = plan.restore_bytes, full.restore_bytes
    passes = result["memory"]
    base = statistics.median(m["rss_before"] for m in passes)
    peaks = {ph: statistics.median([m["peak"][ph] for m in passes]) for ph in PHASES}
    parts = {"weights": w_full, "other": base - w_now, "kv_cache": full.kv_bytes, "restore_cache": restore_full,
             "activations": peaks["transformer"] - base - plan.kv_bytes - restore_now,
             "decoder": peaks["vae"] - base if subj.vae is not None else 0, "text": peaks["text"] - base}
    fixed = parts["weights"] + parts["other"]
    est = {"text": fixed + parts["text"],
           "transformer": fixed + parts["kv_cache"] + parts["restore_cache"] + parts["activations"],
           "vae": fixed + parts["decoder"] if subj.vae is not None else 0}
    upcast = max(p.numel() for p in subj.model.parameters()) * 4 if itemsize < 4 else 0
    return {"peak_bytes": max(est.values()), "peak_by_phase": est,
            "memory_arithmetic": {"parts": parts, "measured_peaks": peaks, "rss_before": base,
                                  "weight_dtype": str(subj.model.pos_start.dtype), "weights_now": w_now,
                                  "weights_full": w_full, "kv_now": plan.kv_bytes, "kv_full": full.kv_bytes,
                                  "kv_per_layer_full": full.kv_bytes / subj.full_cfg.depth,
                                  "restore_now": restore_now, "restore_full": restore_full,
                                  "largest_weight_upcast": upcast}}


# --------------------------------------------------------------------------------------------------
# Running cases A/B/A/B
# --------------------------------------------------------------------------------------------------
HEAP_KEPT = False  # whether keep_freed_memory is in force


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed buffers in the process (returns False where that is not possible).
    Only with --keep-heap: it changes the allocator for the rest of the process, timed calls
    included, which then no longer time what a plain `Pipeline.generate` call costs.

    By default glibc serves every large buffer with a fresh mmap and unmaps it on free, so every
    sub-layer of every scale faults its activations back in page by page; in this VM that costs
    about 1 ms per MB, a quarter of a 2B-shape block's time at 32x32. jemalloc or tcmalloc do the
    same job for any program (LD_PRELOAD).
    """
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    global HEAP_KEPT
    HEAP_KEPT = bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**62))
    return HEAP_KEPT


@contextlib.contextmanager
def system_malloc_for_large_buffers():
    """Within the block, glibc serves buffers of 1 MiB and more with their own mmap again (its
    default), and unmaps them on free; afterwards the keep_freed_memory settings are back.

    For the VAE decoder: its whole-resolution maps are gigabytes each and of ever-changing sizes, so
    in a kept heap the hole one leaves cannot hold the next and RSS grows past the bytes alive (by
    about 2.6 GiB at 2048x2048: 11.07 vs 8.51); with mmap, RSS is what a normal process would hold."""
    M_MMAP_THRESHOLD, M_MMAP_MAX = -3, -4
    libc = ctypes.CDLL("libc.so.6") if HEAP_KEPT else None
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(M_MMAP_MAX, 1 << 16)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, 0)


def run_cases(subj: Subject, cases: list[Case], warmup: int, repeats: int,
              after_round: Callable[[], None] = lambda: None) -> dict[Case, dict]:
    """Warm-up rounds, then `repeats` rounds of every case in turn (A/B/A/B), then one untimed
    memory pass per case (`memory_once`)."""
    plans = {case: plan_case(subj, case) for case in cases}
    results = {case: {"plan": plans[case], "samples": [], "memory": []} for case in cases}
    for rnd in range(warmup + repeats):
        for case in cases:
            sample = timed_once(subj, plans[case])
            tag = "warm-up" if rnd < warmup else f"round {rnd - warmup + 1}/{repeats}"
            print(f"  {tag:12s} {case.label:44s} total {sample['total']:8.2f} s  transformer "
                  f"{sample['transformer']:8.2f} s  vae {sample['vae']:7.2f} s", flush=True)
            if rnd >= warmup:
                results[case]["samples"].append(sample)
        after_round()
    for case in cases:
        results[case]["memory"].append(memory_once(subj, plans[case]))
    return results


def summarize(subj: Subject, case: Case, result: dict) -> dict:
    """JSON-ready summary of one case: times with spread, per scale and layer, FLOP rates, memory."""
    plan, samples, passes = result["plan"], result["samples"], result["memory"]
    times = {k: stats([s[k] for s in samples]) for k in ("total", *PHASES)}
    rate = {"transformer": plan.flops["transformer_flops"] / times["transformer"]["median"] / 1e9,
            "vae": plan.flops["vae_flops"] / times["vae"]["median"] / 1e9 if subj.vae is not None else None}
    p = plan.prune
    return {
        "label": case.label, "subject": case.subject, "numerics": subj.pipe.numerics, "res": case.res, "prune_on": case.prune,
        "cfg_stop_on": case.cfg_stop, "depth": subj.model.cfg.depth, "full_depth": subj.full_cfg.depth,
        "prune": {"drop": p.drop, "skip": sorted(p.skip), "layers": list(p.layers), "cache_scale": p.cache_scale,
                  "selector": p.selector, "rank": p.rank, "cfg_stop": p.cfg_stop},
        "cfg_stop_scale": p.guidance_stop(plan.settings.cfg_stop_scale), "text_tokens": subj.text_tokens,
        "scales_run": [list(sc.hw) for sc in plan.counts], "flops": plan.flops, "kv_cache_bytes": plan.kv_bytes,
        "time": times,
        "scale_time": [stats([s["scales"][i] for s in samples]) for i in range(len(plan.counts))],
        "layer_time": [[statistics.median(s["layers"][i][li] for s in samples) for li in range(len(row))]
                       for i, row in enumerate(samples[0]["layers"])],
        "gflops": rate,
        "peak_bytes": {ph: stats([m["peak"][ph] for m in passes]) for ph in PHASES},
        "rss_before": statistics.median(m["rss_before"] for m in passes),
    }


def compare_cases(cases: list[dict]) -> list[dict]:
    """For each subject and resolution of this run, every pruned case against its unpruned peer (same
    CFG stop), every CFG-stop case against its peer without, and pruned + CFG-stop against neither."""
    by = {(c["subject"], c["res"], c["prune_on"], c["cfg_stop_on"]): c for c in cases}
    out = []
    for (subj, res, prune, stop), b in by.items():
        prune_word = "prune" if prune is True else str(prune)
        stop_word = "cfg-stop" if stop is True else f"cfg-stop@{stop}"
        pairs = [(prune_word, (subj, res, False, stop)) if prune is not False else None,
                 (stop_word, (subj, res, prune, False)) if stop is not False else None,
                 (f"{prune_word}+{stop_word}", (subj, res, False, False)) if prune is not False and stop is not False
                 else None]
        out += [ab(what, by[key], b) for what, key in filter(None, pairs) if key in by]
    for c in cases:  # --numerics arms: each mode against the reference numerics of the same case
        ref = next((r for r in cases if r.get("numerics") == "reference" != c.get("numerics")
                    and same_case(r, c)), None)
        if ref is not None:
            out.append(ab(f"numerics {c['numerics']}", ref, c))
    return out


def same_case(a: dict, b: dict) -> bool:
    """Two cases that differ only in their numerics (their subjects' names carry it: `name@mode`)."""
    return (a["subject"].split("@")[0], a["res"], a["prune_on"], a["cfg_stop_on"]) == \
        (b["subject"].split("@")[0], b["res"], b["prune_on"], b["cfg_stop_on"])


def ab(what: str, a: dict, b: dict) -> dict:
    """Ratios of case a (baseline) over case b; and of their full-depth estimates when present."""
    def ratio(x, y):
        return x / y if y else None
    row = {"what": what, "baseline": a["label"], "variant": b["label"],
           "speedup_total": ratio(a["time"]["total"]["median"], b["time"]["total"]["median"]),
           "speedup_transformer": ratio(a["time"]["transformer"]["median"], b["time"]["transformer"]["median"]),
           "flop_ratio_transformer": ratio(a["flops"]["transformer_flops"], b["flops"]["transformer_flops"]),
           "memory_ratio": ratio(max(p["median"] for p in b["peak_bytes"].values()),
                                 max(p["median"] for p in a["peak_bytes"].values()))}
    ea, eb = a.get("full_depth_estimate"), b.get("full_depth_estimate")
    if ea and eb:
        row["full_depth"] = {"speedup_total": ratio(ea["total"], eb["total"]),
                             "speedup_transformer": ratio(ea["transformer"], eb["transformer"]),
                             "flop_ratio_transformer": ratio(ea["transformer_flops"], eb["transformer_flops"]),
                             "memory_ratio": ratio(eb["peak_bytes"], ea["peak_bytes"])}
    return row


def machine_info() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"), "loadavg": os.getloadavg(),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"), "bf16_units": sorted(set(BF16_UNITS) & cpu_flags()),
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


class PeakLog:
    """Matmul and convolution peaks, measured at the start and after every round of a run: on a shared
    machine the rate a plain kernel gets changes, and the phases are compared with the same moments."""

    def __init__(self, device: torch.device, quick: bool):
        self.device, self.quick = device, quick
        self.samples: dict[str, list[dict]] = {"matmul": [], "conv": []}

    def measure(self) -> None:
        load = os.getloadavg()
        for kind, peak in (("matmul", matmul_peak), ("conv", conv_peak)):
            self.samples[kind].append({**peak(self.device, quick=self.quick), "loadavg": load})
        print(f"matmul peak {self.samples['matmul'][-1]['gflops']:.1f} GFLOP/s, 3x3 conv peak "
              f"{self.samples['conv'][-1]['gflops']:.1f} GFLOP/s; load {load[0]:.2f}", flush=True)

    def summary(self, kind: str) -> dict:
        rates = [s["gflops"] for s in self.samples[kind]]
        return {"median": statistics.median(rates), "max": max(rates), "samples": self.samples[kind]}


def to_device(subj: Subject, device: torch.device) -> None:
    subj.pipe.device = device
    for module in (subj.model, subj.pipe.text_encoder, subj.vae):
        if module is not None:  # a VAE that does not decode stays on the meta device
            module.to(device)


def redundant(case: Case, cases: list[Case]) -> bool:
    """stagevar with --cfg-stop refine is stagevar: its schedule already stops CFG at the refinement stage."""
    plain = Case(case.subject, case.res, case.prune, False)
    return case.prune == "stagevar" and case.cfg_stop == "refine" and plain in cases


def subjects_and_cases(args, device: torch.device):
    """Each subject of the run, built one at a time on `device`, with its cases (res x prune x cfg-stop)."""
    for name, numerics in ((n, m) for n in args.subjects for m in args.numerics):
        subj = make_subject(name, args, numerics)
        if subj is None:
            continue
        to_device(subj, device)
        cases = [Case(subj.name, r, p, s) for r in args.res for p in args.prune for s in args.cfg_stop]
        yield subj, [c for c in cases if not redundant(c, cases)]
        del subj  # before the next subject is built: only one model in memory at a time


def run_bench(args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    report = {"args": vars(args), "machine": machine_info(), "keep_freed_memory": args.keep_heap and keep_freed_memory()}
    peaks = PeakLog(device, args.quick)
    peaks.measure()
    summaries = []
    for subj, cases in subjects_and_cases(args, device):
        results = run_cases(subj, cases, args.warmup, args.repeats, after_round=peaks.measure)
        table = layer_table(list(results.values()))
        for case, result in results.items():
            summary = summarize(subj, case, result)
            if subj.model.cfg.depth != subj.full_cfg.depth:
                summary["full_depth_estimate"] = extrapolate(subj, case, result, table)
            summaries.append(summary)
        del subj, results
        release_memory()
    report["matmul_peak"], report["conv_peak"] = mm, conv = peaks.summary("matmul"), peaks.summary("conv")
    for c in summaries:  # shares of the median peak rates seen during this run
        rate = c["gflops"]
        c["pct_of_peak"] = {"transformer": 100 * rate["transformer"] / mm["median"],
                            "vae": 100 * rate["vae"] / conv["median"] if rate["vae"] else None,
                            "vae_vs_matmul": 100 * rate["vae"] / mm["median"] if rate["vae"] else None}
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["cases"], report["comparisons"] = summaries, compare_cases(summaries)
    return report


def run_direct(args) -> dict:
    """Plain `Pipeline.generate` calls, timed from outside with nothing attached (no hooks, no memory
    pass, no peak measurements): what a user's script sees, to check the benchmark's figures against."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    report = {"args": vars(args), "machine": machine_info(), "keep_freed_memory": args.keep_heap and keep_freed_memory(),
              "runs": []}
    for subj, cases in subjects_and_cases(args, device):
        plans = {case: plan_case(subj, case) for case in cases}
        for rnd in range(args.warmup + args.repeats):
            for case in cases:
                release_memory()
                t0 = time.perf_counter()
                out = subj.pipe.generate(PROMPT, **plans[case].generate_kwargs)
                wall = time.perf_counter() - t0
                print(f"  {'warm-up' if rnd < args.warmup else 'timed':8s} {case.label:44s} wall {wall:8.2f} s  "
                      + "  ".join(f"{k} {v:.2f} s" for k, v in out.timings.items()), flush=True)
                if rnd >= args.warmup:
                    report["runs"].append({"label": case.label, "depth": subj.model.cfg.depth,
                                           "full_depth": subj.full_cfg.depth, "wall": wall, "timings": out.timings,
                                           "loadavg": os.getloadavg()})
        del subj
        release_memory()
    report["machine"]["loadavg_end"] = os.getloadavg()
    return report


# --------------------------------------------------------------------------------------------------
# Output: JSON, markdown, plot
# --------------------------------------------------------------------------------------------------
def machine_line(report: dict) -> str:
    m = report["machine"]
    return (f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
            f"({m['cpu_capability']} kernels, oneDNN ISA limit {m.get('ONEDNN_MAX_CPU_ISA') or 'none'}, bf16 units: "
            f"{', '.join(m.get('bf16_units') or ['none'])}), {m['torch_threads']} threads; load average "
            f"{m['loadavg'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end.")


def method_lines(report: dict) -> list[str]:
    """How the figures were taken, in words: what is timed, with which allocator, and the memory pass."""
    kept = report.get("keep_freed_memory")
    allocator = ("glibc told to keep freed memory in the heap for the whole run (--keep-heap), timed calls "
                 "included" if kept else "glibc's defaults, as in any process")
    memory = ("one separate, untimed generation per case after the timed rounds; RSS sampled every 2 ms, "
              "phases cut where the scale loop starts and where generate calls `Pipeline.decode`; freed "
              "memory is handed back to the OS (malloc_trim) before the decoder")
    if kept:
        memory += ", which runs with glibc's mmap for buffers of 1 MiB and more (`system_malloc_for_large_buffers`)"
    return ["", f"Timing: every round is one `Pipeline.generate` call; the text / transformer / VAE split is its "
            f"`Output.timings` (the VAE phase includes the conversion to PIL images). Allocator: {allocator}. "
            f"Memory: {memory}.", ""]


def markdown(report: dict) -> str:
    mm, conv = report["matmul_peak"], report["conv_peak"]
    lines = [machine_line(report) + f" Matmul peak (fp32, measured {len(mm['samples'])} times during the run) "
             f"median {mm['median']:.1f}, max {mm['max']:.1f} GFLOP/s; 3x3 convolution peak (`run.conv_peak`, "
             f"channels-last) median {conv['median']:.1f}, max {conv['max']:.1f} GFLOP/s; '% of peak' is against "
             f"the medians. Numerics {', '.join(sorted({c.get('numerics', '?') for c in report['cases']}))}; "
             f"transformer weights {report['args'].get('weight_dtype', 'fp32')}, VAE decoding "
             f"{report['args'].get('decode', 'auto')}.", *method_lines(report),
             "| case | depth | total s | spread | text s | transformer s | VAE s | transformer TFLOP | "
             "GFLOP/s | % of matmul peak | peak RSS GiB | KV cache GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in report["cases"]:
        t = c["time"]
        rss = max(p["median"] for p in c["peak_bytes"].values()) / GiB
        lines.append(f"| {c['label']} | {c['depth']} | {t['total']['median']:.2f} | {100 * t['total']['spread']:.0f} % | "
                     f"{t['text']['median']:.2f} | {t['transformer']['median']:.2f} | {t['vae']['median']:.2f} | "
                     f"{c['flops']['transformer_flops'] / 1e12:.3f} | {c['gflops']['transformer']:.1f} | "
                     f"{c['pct_of_peak']['transformer']:.0f} % | {rss:.2f} | {c['kv_cache_bytes'] / GiB:.2f} |")
    est = [c for c in report["cases"] if "full_depth_estimate" in c]
    if est:
        lines += ["", "Extrapolated to the real depth (measured layers re-used; see `run.extrapolate`):", "",
                  "| case | depth | total s | transformer s | VAE s | transformer TFLOP | peak GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for c in est:
            e = c["full_depth_estimate"]
            lines.append(f"| {c['label']} | {e['depth']} | {e['total']:.1f} | {e['transformer']:.1f} | {e['vae']:.1f} | "
                         f"{e['transformer_flops'] / 1e12:.2f} | {e['peak_bytes'] / GiB:.2f} |")
        lines += memory_lines(est)
    lines += vae_lines(report["cases"])
    if report["comparisons"]:
        lines += ["", "| A/B | speedup total | speedup transformer | transformer FLOP ratio | memory B/A |"
                  " real depth: speedup total | transformer | FLOP ratio | memory B/A |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["comparisons"]:
            f = r.get("full_depth", {})
            cells = [r["speedup_total"], r["speedup_transformer"], r["flop_ratio_transformer"], r["memory_ratio"],
                     f.get("speedup_total"), f.get("speedup_transformer"), f.get("flop_ratio_transformer"),
                     f.get("memory_ratio")]
            variant = r['variant'] if r['what'].startswith('numerics') else r['variant'].split(' ', 2)[-1]
            lines.append(f"| {r['baseline']} -> {variant} | "
                         + " | ".join("" if x is None else f"{x:.2f}" for x in cells) + " |")
    return "\n".join(lines) + "\n"


def vae_lines(cases: list[dict]) -> list[str]:
    """The decoder's analytic FLOPs and its rate against the convolution and the matmul peak."""
    decoded = [c for c in cases if c["gflops"]["vae"]]
    if not decoded:
        return []
    lines = ["", "VAE decoder: FLOPs counted per convolution (2 k^2 C_in C_out H W, `flops.vae_decode_count`, "
             "equal to torch's FlopCounterMode in tests/test_flops.py); oneDNN runs them as direct "
             "convolutions, so the count is the work done:", "",
             "| case | VAE s | TFLOP | GFLOP/s | % of conv peak | % of matmul peak |", "|---|---:|---:|---:|---:|---:|"]
    for c in decoded:
        pct = c["pct_of_peak"]
        lines.append(f"| {c['label']} | {c['time']['vae']['median']:.2f} | {c['flops']['vae_flops'] / 1e12:.3f} | "
                     f"{c['gflops']['vae']:.1f} | {pct['vae']:.0f} % | {pct['vae_vs_matmul']:.0f} % |")
    return lines


def direct_markdown(report: dict) -> str:
    """The --direct runs: wall time and `Output.timings` of each plain `Pipeline.generate` call."""
    lines = [machine_line(report) + " Plain `Pipeline.generate` calls timed from outside (`bench --direct`); "
             f"allocator: {'kept heap (--keep-heap)' if report.get('keep_freed_memory') else 'glibc defaults'}.", "",
             "| case | depth | wall s | text s | transformer s | VAE s | load |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        t = r["timings"]
        lines.append(f"| {r['label']} | {r['depth']} of {r['full_depth']} | {r['wall']:.2f} | {t['text']:.2f} | "
                     f"{t['transformer']:.2f} | {t['vae']:.2f} | {r['loadavg'][0]:.2f} |")
    return "\n".join(lines) + "\n"


def memory_lines(cases: list[dict]) -> list[str]:
    """The real-depth memory estimate of each case as a sum of its parts (see `memory_estimate`)."""
    lines = ["", "Peak memory at the real depth, GiB: transformer phase = weights + other + KV + restoration "
             "+ activations; VAE phase = weights + other + decoder (`run.memory_estimate`):", "",
             "| case | weights | other | KV (per layer x depth) | restoration | activations | transformer phase | "
             "decoder | VAE phase | peak |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        e = c["full_depth_estimate"]
        a, ph = e["memory_arithmetic"], e["peak_by_phase"]
        p = {k: v / GiB for k, v in a["parts"].items()}
        lines.append(f"| {c['label']} | {p['weights']:.2f} ({a['weight_dtype'].removeprefix('torch.')}) | "
                     f"{p['other']:.2f} | {p['kv_cache']:.2f} ({a['kv_per_layer_full'] / GiB:.3f} x {e['depth']}) | "
                     f"{p['restore_cache']:.2f} | {p['activations']:.2f} | {ph['transformer'] / GiB:.2f} | "
                     f"{p['decoder']:.2f} | {ph['vae'] / GiB:.2f} | {e['peak_bytes'] / GiB:.2f} |")
    return lines


def plot(report: dict, path: Path) -> bool:
    """Per-scale median time of every case (log scale); False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for c in report["cases"]:
        labels = [f"{h}x{w}" for h, w in c["scales_run"]]
        ax.plot(labels, [s["median"] for s in c["scale_time"]], marker="o", label=f"{c['label']} (depth {c['depth']})")
    ax.set_yscale("log")
    ax.set_xlabel("scale")
    ax.set_ylabel("seconds (median)")
    ax.set_title("time per scale")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return True


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if "runs" in report:  # --direct
        write_text(out / "direct.json", json.dumps(report, indent=1, default=str))
        write_text(out / "direct.md", direct_markdown(report))
        print(direct_markdown(report))
        print(f"wrote {out / 'direct.json'}, direct.md")
        return
    write_text(out / "bench.json", json.dumps(report, indent=1, default=str))
    write_text(out / "bench.md", markdown(report))
    plot(report, out / "bench.png")
    print(markdown(report))
    print(f"wrote {out / 'bench.json'}, bench.md, bench.png")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def arms(words: dict[str, bool | str]):
    """An argparse type: "both" (off and on) or a comma-separated list of `words`, e.g. off,on,stagevar."""
    def parse(value: str) -> list[bool | str]:
        names = ["off", "on"] if value == "both" else value.split(",")
        if unknown := [n for n in names if n not in words]:
            raise argparse.ArgumentTypeError(f"unknown arm {unknown[0]!r}: use both or a list of {', '.join(words)}")
        return [words[n] for n in names]
    return parse


PRUNE_ARMS = {"off": False, "on": True, "stagevar": "stagevar"}
CFG_STOP_ARMS = {"off": False, "on": True, "refine": "refine"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m minivar.bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", nargs="+", default=["toy", "infinity-2b-shape"],
                    choices=["tiny", "toy", *SHAPE_MODELS, SYNTHETIC], metavar="SUBJECT",
                    help="tiny, toy, infinity-2b-shape, infinity-8b-shape, or infinity-2b-synthetic alone")
    ap.add_argument("--res", nargs="+", type=int, default=[1024], help="256 512 1024 2048 ...")
    ap.add_argument("--prune", type=arms(PRUNE_ARMS), default=[False, True],
                    help="off, on (prune=True), stagevar, both (off,on: default) or a list, e.g. off,on,stagevar")
    ap.add_argument("--cfg-stop", type=arms(CFG_STOP_ARMS), default=[False],
                    help="stage-aware CFG: off (default), on (from 1/8 of the final tokens), refine (from the "
                         "refinement stage), both (off,on) or a list, e.g. off,refine")
    ap.add_argument("--depth", type=int, default=2, help="layers of the shape models (extrapolated to the real depth)")
    ap.add_argument("--no-vae", action="store_true", help="skip VAE decoding")
    ap.add_argument("--decode", choices=list(DECODE_MODES), default="auto",
                    help="VAE decoding: in row bands, of whole maps, or auto (bands above 512x512 pixels)")
    ap.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="stored",
                    help="transformer weight storage: as minivar.load's default (the file's dtype; bf16 for the "
                         "shape models, as Infinity publishes), fp32 or bf16")
    ap.add_argument("--numerics", nargs="+", choices=NUMERICS, default=["auto"],
                    help="what the math runs in (numerics.py), one subject per value: auto (default), bf16, fp32, "
                         "reference; e.g. --numerics auto reference compares the default with the reference")
    ap.add_argument("--text-tokens", type=int, default=32, help="text tokens per prompt of the shape models")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep-heap", action="store_true",
                    help="make glibc keep freed memory for the whole run (fewer page faults; timings then "
                         "differ from a plain Pipeline.generate in a default process)")
    ap.add_argument("--direct", action="store_true",
                    help="time plain Pipeline.generate calls (no hooks, memory pass or peaks): direct.json/md")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--quick", action="store_true", help="CI smoke test: tiny-a at 512, one round, no warm-up")
    args = ap.parse_args(argv)
    if args.quick:
        args.subjects, args.res, args.repeats, args.warmup = ["tiny"], [512], 1, 0
    args.prune, args.cfg_stop = list(args.prune), list(args.cfg_stop)
    if problem := bad_arguments(args):
        ap.error(problem)
    return args


def bad_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the parsed arguments, in one line, before any model is built (None: nothing)."""
    from ..pipeline import check_device

    for name, least in (("repeats", 1), ("warmup", 0), ("threads", 1), ("depth", 1)):
        if (value := getattr(args, name)) < least:
            return f"--{name} {value}: use {least} or more"
    if problem := text_tokens_problem(args.text_tokens):
        return problem
    for r in args.res:
        try:
            scale_schedule(r)
        except ValueError as e:
            return f"--res {r}: {e}"
    try:
        check_device(args.device)
    except ValueError as e:
        return f"--device: {e}"
    if args.out.exists() and not args.out.is_dir():
        return f"--out {args.out} is a file: give a folder for bench.json, bench.md and bench.png"
    return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if SYNTHETIC in args.subjects:
        from . import synthetic

        if args.subjects != [SYNTHETIC]:
            raise SystemExit(f"{SYNTHETIC} runs on its own (each arm in a fresh process): --subjects {SYNTHETIC}")
        return synthetic.bench(args.res, args.prune, PROMPT, args.out)
    report = run_direct(args) if args.direct else run_bench(args)
    write(report, args.out)
    return report


if __name__ == "__main__":
    main()
