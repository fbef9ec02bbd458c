"""Text -> image: tokenizer and T5, the scale loop, the VAE decoder, behind one `Pipeline`.

    pipe = minivar.load("infinity-2b")                       # or paths to your own files
    out = pipe.generate("a red fox in snow", res=1024, prune=True, seed=1)
    out.image.save("fox.png")
"""
from __future__ import annotations

import inspect
import os
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .loading.checkpoint import load_infinity, load_t5, load_vae
from .model.config import BUDGETS, HIGH_RES, RES_TO_BUDGET, InfinityConfig, nearest_template, scale_schedule
from .model.pruning import PruneSchedule, is_index, is_real, model_stages, resolve_prune
from .model.sampling import Plan, Settings, Trace, plan, run_scale_loop
from .model.t5 import T5Encoder, Tokenizer
from .model.transformer import Infinity
from .model.vae import BSQVAE, VAEConfig, banded_decode_bytes, pixels_to_image, use_bands
from .numerics import COMPUTE_DTYPE, prepare as prepare_numerics, context as numerics_context, resolve as resolve_numerics

@dataclass
class Output:
    images: list[Image.Image]
    summed_codes: torch.Tensor            # (B, d, H, W) float32: the latent fed to the VAE decoder
    trace: Trace | None
    scales: list[tuple[int, int]]
    prune: PruneSchedule
    timings: dict[str, float] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)  # per scale of `scales`: pruning.model_stages against the model
    numerics: str = ""  # what the math ran in: "bf16", "fp32" or "reference" (numerics.py)

    @property
    def image(self) -> Image.Image:
        return self.images[0]


class Pipeline:
    def __init__(self, transformer: Infinity, vae: BSQVAE, text_encoder: T5Encoder, tokenizer: Tokenizer,
                 name: str = "custom", device: str | torch.device = "cpu", numerics: str = "fp32",
                 numerics_reason: str = ""):
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.name, self.device = name, torch.device(device)
        self.numerics, self.numerics_reason = numerics, numerics_reason  # numerics.py: "bf16", "fp32", "reference"

    # ---- text ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[list[torch.Tensor], list[int]]:
        """T5 features of each prompt's real tokens (EOS included): list of (n_i, Ct), and the n_i.

        Upstream encodes 512 positions, padding included; the padding is masked out of every real
        token's attention, so only the reference numerics pay for it (the features agree within
        rounding, tests/test_numerics_modes.py). The others encode up to the longest prompt."""
        ids, mask = self.tokenizer(prompts)
        if self.numerics != "reference":
            n = int(mask.sum(-1).max())
            ids, mask = ids[:, :n], mask[:, :n]
        with numerics_context(self.numerics, self.device):  # attention kernels only: no `images`
            hidden = self.text_encoder(ids.to(self.device), mask.to(self.device)).float()  # (B, n, Ct)
        lens = mask.sum(-1).tolist()
        return [h[:n] for h, n in zip(hidden, lens)], lens

    def text_rows(self, prompts: list[str], negative: str | None, cfg_on: bool):
        """Packed text rows for the transformer: conditional images first, then unconditional ones."""
        feats, lens = self.encode_text(prompts)
        if cfg_on:
            if negative:
                neg, _ = self.encode_text([negative] * len(prompts))
            else:  # the learned unconditional rows, as many as the prompt has tokens
                neg = [self.transformer.cfg_uncond[:n].float() for n in lens]
            feats = feats + neg
        bounds = np.cumsum([0] + [f.shape[0] for f in feats]).tolist()
        return torch.cat(feats), list(zip(bounds[:-1], bounds[1:]))

    # ---- generation ------------------------------------------------------------------------------
    @property
    def token_px(self) -> int:
        """Pixels per side of a transformer token: 16 for Infinity (the 8B's 8-pixel VAE cells are
        patchified 2x2), 4 for the toy."""
        return self.vae.cfg.patch_size * (2 if self.transformer.cfg.spatial_patchify else 1)

    def schedule(self, res: int | str | None, h_div_w: float) -> list[tuple[int, int]]:
        """Scales for an image of side `res` pixels, a budget name ("0.06M"), or None: the model's own budget.

        Infinity's budget table counts 16-pixel tokens, so a model with smaller tokens reads it at the
        same token grid: the toy's 64 pixels are Infinity's 256 (budget 0.06M, a 16x16 final grid).
        """
        if res is None:
            return scale_schedule(self.transformer.cfg.pn, h_div_w)
        if isinstance(res, str):
            return scale_schedule(res, h_div_w)
        sides = {side * self.token_px // 16: side for side in RES_TO_BUDGET}  # this model's res -> Infinity's
        if res not in sides or isinstance(res, bool):
            raise ValueError(f"res={res!r} is not available for this model ({self.token_px}-pixel tokens): use one "
                             f"of {sorted(sides)}, a pixel budget {list(BUDGETS) + list(HIGH_RES)}, or None")
        return scale_schedule(sides[res], h_div_w)

    @torch.no_grad()
    def generate(self, prompt: str | list[str], res: int | str | None = None, h_div_w: float = 1.0,
                 cfg=Settings.cfg, tau=Settings.tau, top_k: int = Settings.top_k, top_p: float = Settings.top_p,
                 seed: int | None = Settings.seed, negative_prompt: str | None = None,
                 cfg_insertion_layer: int = Settings.cfg_insertion_layer, force_bits: list[torch.Tensor] | None = None,
                 trace: bool = False, prune=False, cfg_stop_scale: int | None = Settings.cfg_stop_scale,
                 progress=False, output_type: str = "pil") -> Output:
        """Generate one image per prompt. See README for every argument; shapes are in `Output`.

        Sampling defaults come from `sampling.Settings`. Pruning policy: this library call computes the
        exact model unless asked (`prune=False`), while the picture-making entry points, `minivar.sample`
        and the `minivar` command, prune by default (`prune=True`).

        `output_type="latent"` stops before the VAE decoder (`Output.images` is then empty).
        """
        check_arguments(prompt=prompt, res=res, h_div_w=h_div_w, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p,
                        seed=seed, negative_prompt=negative_prompt, cfg_insertion_layer=cfg_insertion_layer,
                        trace=trace, prune=prune, cfg_stop_scale=cfg_stop_scale, progress=progress,
                        output_type=output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        scales, model_cfg = self.schedule(res, h_div_w), self.transformer.cfg
        schedule = resolve_prune(prune, model_cfg, scales)
        check_against_schedule(cfg=cfg, tau=tau, cfg_stop_scale=cfg_stop_scale, cfg_insertion_layer=cfg_insertion_layer,
                               n_scales=len(scales), depth=model_cfg.depth)
        seed = None if seed is None else int(seed)  # numpy integers pass the checks; torch generators need an int
        settings = Settings(cfg, tau, int(top_k), float(top_p), seed, cfg_insertion_layer, cfg_stop_scale, force_bits)
        the_plan = plan(model_cfg, scales, nearest_template(h_div_w), settings, schedule)
        check_force_bits(force_bits, [(len(prompts), *step.hw, model_cfg.d_vae) for step in the_plan.ran])
        kv_itemsize = self.transformer.kv_dtype.itemsize
        need = estimate(the_plan, model_cfg, self.vae.cfg, len(prompts), kv_itemsize)
        check_memory(need, self.device, f"generating {len(prompts)} image(s) at res={res}")
        if progress is True:  # a tqdm bar over the scales; a callable wrapping the scale indices is used as is
            from tqdm.auto import tqdm

            progress = partial(tqdm, desc="scales", unit="scale", leave=False)
        # reference numerics compute image by image (results don't depend on the batch); bf16 attention
        # stays on kernels this CPU's settings can run
        with numerics_context(self.numerics, self.device, len(prompts)):
            return self.run(prompts, the_plan, settings, negative_prompt, Trace() if trace else None,
                            progress or None, decode=output_type == "pil")

    def run(self, prompts: list[str], p: Plan, s: Settings, negative_prompt: str | None, trace: Trace | None,
            progress, decode: bool = True) -> Output:
        """Text -> scale loop -> decode. Each model hands back its mapped pages once it is done (`release_mapped`).
        The phase times wait for the device at each boundary (`clock`)."""
        stamps = [clock(self.device)]
        kv, segments = self.text_rows(prompts, negative_prompt, p.cfg_on)
        release_mapped(self.text_encoder)
        cond = self.transformer.condition(kv, segments)
        stamps.append(clock(self.device))
        summed = run_scale_loop(self.transformer, cond, len(prompts), p, s, trace, progress=progress)
        release_mapped(self.transformer)  # its 4 GiB (2B, bf16) of pages are not needed by the decoder
        stamps.append(clock(self.device))
        images = self.decode(summed) if decode else []
        release_mapped(self.vae)
        stamps.append(clock(self.device))
        times = dict(zip(("text", "transformer", "vae"), np.diff(stamps).tolist()))
        return Output(images, summed.squeeze(2).float().contiguous(), trace, p.scales, p.prune, times,
                      [step.stage for step in p.steps], self.numerics)

    def stages(self, scales: list[tuple[int, int]]) -> list[str]:
        """The StageVAR stage of each scale (`pruning.stages`), against the model's own reference grid."""
        return model_stages(self.transformer.cfg, scales)

    @torch.no_grad()
    def decode(self, summed_Bd1HW: torch.Tensor) -> list[Image.Image]:
        """Latent (B, d, 1, H, W) -> RGB images. The latent keeps its (channels-last) memory layout."""
        rgb = pixels_to_image(self.vae.decode(summed_Bd1HW.squeeze(-3)).float()).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(x)) for x in rgb]

    # ---- images -> bits --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image, res: int | str | None = None, h_div_w: float | None = None) -> list[torch.Tensor]:
        """VAE-encode an image into per-scale bits (B, h, w, d) int64, the layout of `trace.bits`.

        `image` is a PIL image, a path, a uint8 (H, W, 3) array/tensor, or a float tensor (B, 3, H, W)
        in [-1, 1]. It is resized and centre-cropped to the schedule's final size.
        """
        pixels = to_pixels(image)
        if h_div_w is None:
            h_div_w = pixels.shape[2] / pixels.shape[3]
        scales = self.schedule(res, h_div_w)
        patchify = self.transformer.cfg.spatial_patchify
        vae_scales = [(1, 2 * h, 2 * w) if patchify else (1, h, w) for h, w in scales]
        p = self.vae.cfg.patch_size
        pixels = resize_crop(pixels, vae_scales[-1][1] * p, vae_scales[-1][2] * p).to(self.device)
        _, _, bits, _ = self.vae.encode_to_bits(pixels, vae_scales)
        return [vae_bits_to_tokens(b, patchify) for b in bits]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`: a GPU op returns before it runs (a CPU op once it is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def clock(device: torch.device) -> float:
    """time.perf_counter() once `device` has finished its queued work, so that a phase's time is its own."""
    synchronize(device)
    return time.perf_counter()


def vae_bits_to_tokens(bits_B1hwd: torch.Tensor, patchify: bool) -> torch.Tensor:
    """VAE bits (B, 1, h, w, d) -> transformer bits (B, h', w', d'); 2x2 patchify for Infinity-8B."""
    bits = bits_B1hwd.squeeze(1)
    if patchify:
        bits = F.pixel_unshuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # (B, h/2, w/2, 4d)
    return bits.long()


def to_pixels(image) -> torch.Tensor:
    """Any supported image form -> float (B, 3, H, W) in [-1, 1], contiguous NCHW."""
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image))  # a writable copy
    if not isinstance(image, torch.Tensor):
        raise bad("image", image, IMAGE_FORMS)
    if image.dtype == torch.uint8:
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise bad("image", image, f"a uint8 image is (H, W, 3) or (B, H, W, 3) RGB; {IMAGE_FORMS}")
        from .model.vae import image_to_pixels
        return image_to_pixels(image)
    ok = image.is_floating_point() and image.ndim == 4 and image.shape[1] == 3 and image.numel() > 0
    if not ok or not torch.isfinite(image).all() or image.abs().max() > 1:
        raise bad("image", image, f"a float image is (B, 3, H, W) with values in [-1, 1]; {IMAGE_FORMS}")
    return image.float().contiguous()


IMAGE_FORMS = "use a PIL image, a path, a uint8 (H, W, 3) array or tensor, or a float tensor (B, 3, H, W) in [-1, 1]"


def resize_crop(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Resize (keeping aspect) so the image covers H x W, then centre-crop; identity at the right size."""
    if x.shape[2:] == (H, W):
        return x
    s = max(H / x.shape[2], W / x.shape[3])
    size = (max(H, round(x.shape[2] * s)), max(W, round(x.shape[3] * s)))
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    top, left = (size[0] - H) // 2, (size[1] - W) // 2
    return x[:, :, top : top + H, left : left + W].contiguous()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def load(name: str | Path | None = None, *, transformer: str | Path | None = None, vae: str | Path | None = None,
         text_encoder: str | Path | None = None, config=None, vae_config=None, device: str = "cpu",
         dtype: torch.dtype | None = None, revision: str | None = None, numerics: str | None = None) -> Pipeline:
    """Load a pipeline from a preset name ("infinity-2b", "infinity-8b", "toy"), a model directory, or
    explicit files, onto `device` ("cpu", "cuda", "cuda:N", "mps" or a torch.device).

    Files given explicitly win over the preset's; missing preset files are downloaded (see hub.py),
    from `revision` of the model repo if given. `numerics` (numerics.py) decides what the math runs in:
    "auto" (the default, or $MINIVAR_NUMERICS): "bf16" where the device has fast bf16, else "fp32";
    "reference": upstream's CPU numbers bit for bit. `pipe.numerics` says what was chosen.
    `dtype=None` keeps the transformer's weights in the dtype its file stores, memory-mapped without a
    copy (Infinity: bf16), except that "bf16" stores float32 weights in bf16; a dtype casts them to it
    (the names "fp32", "bf16", "fp16" work too). The VAE and T5 are float32, or bf16 under "bf16".
    """
    from .loading.hub import resolve_files

    dtype, mode, why = check_load(device, dtype, numerics, name=name, transformer=transformer, vae=vae,
                                  text_encoder=text_encoder, config=config, vae_config=vae_config, revision=revision)
    files = resolve_files(name, transformer=transformer, vae=vae, text_encoder=text_encoder,
                          config=config, vae_config=vae_config, revision=revision)
    # The VAE and T5 in the numerics' dtype; the reference keeps them float32 on CPU (their published dtype).
    cpu = torch.device(device).type == "cpu"
    side_dtype = COMPUTE_DTYPE[mode] if mode != "reference" else torch.float32 if cpu else dtype
    vae_model = load_vae(files.vae, files.vae_config, device=device, dtype=side_dtype)
    cfg = files.config
    if not isinstance(cfg, InfinityConfig):
        cfg = InfinityConfig.from_upstream(cfg, d_vae=None)
    cfg = fit_bits_to_vae(cfg, vae_model.cfg)
    config_name = "the Infinity config" + (f" {files.config}" if isinstance(files.config, (str, Path)) else "")
    model = load_infinity(files.transformer, cfg, device=device, dtype=dtype, config_name=config_name)
    t5 = load_t5(files.text_encoder, device=device, dtype=side_dtype)
    prepare_numerics(mode, model, vae_model, t5)
    return Pipeline(model, vae_model, t5, Tokenizer.from_dir(files.text_encoder), files.name, device, mode, why)


def check_load(device, dtype, numerics, **paths) -> tuple[torch.dtype | None, str, str]:
    """What `load` checks before any file is read or downloaded (`paths`: its file arguments, or sample's
    `model`) -> the torch dtype, the numerics mode and why it was chosen."""
    check_arguments(**paths)
    check_device(device)
    return (check_dtype(dtype), *resolve_numerics(numerics, device))


def fit_bits_to_vae(cfg: InfinityConfig, vae_cfg: VAEConfig) -> InfinityConfig:
    """The transformer's bits per token follow from the VAE (x4 with 2x2 patchify)."""
    from dataclasses import replace

    return replace(cfg, d_vae=vae_cfg.codebook_dim * (4 if cfg.spatial_patchify else 1))


SAMPLE_KEYWORDS = [k for k in inspect.signature(Pipeline.generate).parameters
                   if k not in ("self", "prompt", "output_type")]  # what `sample` passes on to generate


def sample(prompt: str, res: int | None = None, prune=True, model: str = "infinity-2b", device: str = "cpu",
           dtype: torch.dtype | None = None, progress=True, numerics: str | None = None, **kwargs) -> Image.Image:
    """One call from a prompt to a PIL image: loads (downloading if needed, then caching) the model,
    then generates with a progress bar over the scales. `model="toy"` runs offline. The image's
    `info["numerics"]` says which numerics ran (see `load`)."""
    check_prompt_text("prompt", prompt)  # one prompt, one image (Pipeline.generate takes a list)
    if unknown := [k for k in kwargs if k not in SAMPLE_KEYWORDS]:  # all of this before loading a model
        raise TypeError(f"sample() got an unexpected keyword argument {unknown[0]!r}; it takes "
                        f"{', '.join(SAMPLE_KEYWORDS)}, model, device, dtype and numerics")
    check_arguments(res=res, prune=prune, progress=progress, **kwargs)
    pipe = cached_pipeline(model, device, dtype, numerics)  # checks the model, device, dtype and numerics first
    image = pipe.generate(prompt, res=res, prune=prune, progress=progress, **kwargs).images[0]
    image.info["numerics"] = pipe.numerics
    return image


def cached_pipeline(model: str, device: str, dtype: torch.dtype | None, numerics: str | None = None) -> Pipeline:
    """The pipeline `sample` uses: loaded once, at most one model kept. Threads asking at the same time
    wait for one load; a pipeline in use by another thread stays valid when the cache moves on."""
    key = tuple(map(str, (model, device, dtype, numerics)))  # any value hashes; `load` judges them
    with _PIPELINES_LOCK:
        pipe = _PIPELINES.get(key)
        if pipe is None:
            check_load(device, dtype, numerics, model=model)  # before the cache empties
            _PIPELINES.clear()  # keep at most one model in memory
            pipe = _PIPELINES[key] = load(model, device=device, dtype=dtype, numerics=numerics)
        return pipe


_PIPELINES: dict[tuple[str, str, str, str], Pipeline] = {}
_PIPELINES_LOCK = threading.Lock()


# ==================================================================================================
# Argument checks
#
# Argument checks for generation, in one place.
#
# `Pipeline.generate`, `minivar.sample` and the CLI call `check_arguments` before any work is done, and
# `generate` calls `check_against_schedule` once the scale schedule is known. A bad value raises one
# ValueError line that names the argument, the value and what is allowed: never a traceback from inside
# torch, and never a nonsense value accepted silently (a negative temperature flips every logit).
#
# What each argument accepts is one row of the `ARGUMENTS` table. Uses model/config.py (resolutions,
# aspect-ratio templates) and model/pruning.py (`PruneSchedule`, the number tests `is_index`, `is_real`).
# ==================================================================================================
MAX_PROMPT_CHARS = 20_000  # far beyond T5's 512 tokens; longer input is almost surely a mistake
MAX_SEED = 2**64 - 1       # torch generators take a 64-bit unsigned seed
# Far past any useful guidance (upstream uses 3 to 4) and temperature (below it sampling is already
# greedy; top_k=1 is exactly greedy); beyond them the scaled logits or hidden states overflow float32
# into NaN probabilities (cfg 1e30 mixed into the hidden state, tau 1e-38).
MAX_CFG, MIN_TAU = 1000.0, 1e-4
PRUNE_WORDS = ("fastvar", "stagevar", "preset")
BUDGET_NAMES = [*BUDGETS, *HIGH_RES]


# --------------------------------------------------------------------------------------------------
# One value at a time
# --------------------------------------------------------------------------------------------------
# Pipeline.generate's arguments: name -> (what it accepts, the message's advice when it does not).
# The texts of `prompt` and `negative_prompt` are then read one by one by `check_prompt_text`.
ARGUMENTS: dict[str, tuple[Callable[[object], bool], str]] = {
    "prompt": (lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0),
               "use a string or a non-empty list of strings"),
    "negative_prompt": (lambda v: v is None or isinstance(v, str),
                        "use one string (the negative prompt of every image in the batch) or None"),
    "res": (lambda v: v is None or is_index(v) or v in BUDGET_NAMES,
            f"use a side in pixels ({sorted(RES_TO_BUDGET)} for 16-pixel tokens), a pixel budget {BUDGET_NAMES}, "
            "or None"),
    # nearest_template raises its own line for a ratio it cannot snap, naming the trained templates
    "h_div_w": (lambda v: nearest_template(v) > 0, "use a height/width ratio near a trained template"),
    "cfg": (lambda v: is_per_scale(v, lambda c: abs(c) <= MAX_CFG),
            f"use a number in -{MAX_CFG:g}..{MAX_CFG:g}, or a list of one per scale"),
    "tau": (lambda v: is_per_scale(v, lambda t: t >= MIN_TAU),
            f"use a finite number >= {MIN_TAU:g} (top_k=1 samples greedily), or a list of one per scale"),
    "top_k": (lambda v: is_index(v) and v >= 0, "use an integer >= 0 (0 turns the top-k filter off)"),
    "top_p": (lambda v: is_real(v) and 0 <= v <= 1,
              "use a number in [0, 1] (0 or 1 turn the top-p filter off, as upstream's 0 does)"),
    "seed": (lambda v: v is None or (is_index(v) and 0 <= v <= MAX_SEED),
             f"use an integer in 0..2**64-1 ({MAX_SEED}), or None for a random seed"),
    # the ranges of these two depend on the model and the schedule: `check_against_schedule`
    "cfg_insertion_layer": (is_index, "use 0 (guide logits), 1 (no guidance mixing) or a negative layer offset"),
    "cfg_stop_scale": (lambda v: v is None or is_index(v), "use a scale index (an integer) or None"),
    "trace": (lambda v: isinstance(v, bool), "use True or False"),
    # the form only: the schedule a dict or word gives is validated against the scale schedule later
    "prune": (lambda v: v is None or isinstance(v, (bool, dict, PruneSchedule)) or
              (isinstance(v, str) and v in PRUNE_WORDS),
              "use False, True, 'fastvar', 'stagevar', a dict of PruneSchedule fields or a PruneSchedule"),
    "progress": (lambda v: v is None or isinstance(v, bool) or callable(v),
                 "use True, False or a callable that wraps the list of scales"),
    "output_type": (lambda v: v in ("pil", "latent"), "use 'pil' or 'latent'"),
}


def is_path(v) -> bool:
    return isinstance(v, os.PathLike) or (isinstance(v, str) and v.strip() != "")


# minivar.load's arguments (and sample's `model`), by the same rules; `device` and `dtype` have their own checks.
MODEL_NAME = (lambda v: v is None or is_path(v), "use a preset ('infinity-2b', 'infinity-8b', 'toy'), a model "
              "directory, or None with every file given")
LOAD_ARGUMENTS: dict[str, tuple[Callable[[object], bool], str]] = {
    "name": MODEL_NAME,
    "model": MODEL_NAME,
    **{part: (lambda v: v is None or is_path(v), "use a path (a str or Path) or None")
       for part in ("transformer", "vae", "text_encoder")},
    "config": (lambda v: v is None or is_path(v) or isinstance(v, (dict, InfinityConfig)),
               "use a JSON file, a dict of upstream constructor arguments, an InfinityConfig or None"),
    "vae_config": (lambda v: v is None or is_path(v) or isinstance(v, (dict, VAEConfig)),
                   "use a VAE preset name, a JSON file, a dict, a VAEConfig or None"),
    "revision": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""),
                 "use a branch, tag or commit of the model's hub repo, or None"),
}
DEVICE_TYPES = ("cpu", "cuda", "mps")
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}


def check_arguments(**values) -> None:
    """Check the arguments given, by their `Pipeline.generate` or `minivar.load` names; others pass through."""
    for name, value in values.items():
        if name not in ARGUMENTS and name not in LOAD_ARGUMENTS:
            continue
        accepts, allowed = ARGUMENTS.get(name) or LOAD_ARGUMENTS[name]
        if not accepts(value):
            raise bad(name, value, allowed)
        if name in ("prompt", "negative_prompt") and value is not None:
            texts = [(name, value)] if isinstance(value, str) else [(f"{name}[{i}]", t) for i, t in enumerate(value)]
            for where, text in texts:  # an empty negative prompt is fine: it means the default
                check_prompt_text(where, text, blank_ok=name == "negative_prompt")


def check_prompt_text(name: str, text, blank_ok: bool = False) -> None:
    """One prompt: a string of valid Unicode, not too long, with something visible unless `blank_ok`."""
    if not isinstance(text, str):
        raise bad(name, text, "use a string")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} of {len(text)} characters is too long (max {MAX_PROMPT_CHARS}); "
                         "T5 reads only the first 512 tokens anyway")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. undecodable bytes from the command line
        raise bad(name, text, f"it is not valid Unicode text (character {e.start} cannot be encoded as "
                              "UTF-8); pass UTF-8 text") from None
    if not blank_ok and not any(map(is_visible, text)):
        raise bad(name, text, "the prompt is empty or blank (nothing visible); describe the image to generate")


def is_visible(char: str) -> bool:
    """Not whitespace, a control or format character (zero-width space, joiner, BOM: categories C and Z) nor
    a blank letter (the Hangul fillers, the braille blank)."""
    return unicodedata.category(char)[0] not in "CZ" and char not in BLANK_LETTERS


BLANK_LETTERS = "\u115f\u1160\u3164\uffa0\u2800"


def device_available(kind: str) -> bool:
    """Whether this torch build and machine have a device of this type ("cpu", "cuda" or "mps")."""
    return {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[kind]


def check_device(device) -> None:
    """`device` of load and sample: "cpu", "cuda", "cuda:N", "mps" or a torch.device, of a kind this machine has."""
    here = ", ".join(repr(kind) for kind in DEVICE_TYPES if device_available(kind))
    try:
        d = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except RuntimeError:  # not a device string torch knows
        d = None
    if d is None or d.type not in DEVICE_TYPES:
        raise bad("device", device, f"use 'cpu', 'cuda', 'cuda:N' or 'mps' (a string or torch.device); this "
                                    f"machine has {here}")
    if not device_available(d.type):
        raise bad("device", device, f"this machine (torch {torch.__version__}) has no {d.type} device; use {here}")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise bad("device", device, f"this machine has {torch.cuda.device_count()} CUDA device(s), "
                                    f"cuda:0..cuda:{torch.cuda.device_count() - 1}")


def check_dtype(dtype) -> torch.dtype | None:
    """`dtype` of load and sample -> None or a torch dtype; the names of DTYPE_NAMES ("bf16", ...) map to theirs."""
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values()):
        return dtype
    raise bad("dtype", dtype, "use None (each file's own dtype), torch.float32, torch.bfloat16, torch.float16 or "
                              f"one of the names {', '.join(map(repr, DTYPE_NAMES))}")


def is_per_scale(value, test: Callable[[float], bool]) -> bool:
    """cfg and tau: one finite number, or a non-empty list of them, one per scale (the list's length is
    checked against the schedule later, in `check_against_schedule`); `test` is what each must also pass."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return bool(values) and all(is_real(v) and test(v) for v in values)


def check_seed(name: str, value) -> None:
    """The `seed` row of ARGUMENTS, for a seed that comes under another name (the batch command's --seeds)."""
    accepts, allowed = ARGUMENTS["seed"]
    if not accepts(value):
        raise bad(name, value, allowed)


# --------------------------------------------------------------------------------------------------
# Against the scale schedule and the model
# --------------------------------------------------------------------------------------------------
def check_against_schedule(*, cfg, tau, cfg_stop_scale: int | None, cfg_insertion_layer: int, n_scales: int,
                           depth: int) -> None:
    """What only the schedule and the model can judge: per-scale list lengths and indices (forced bits are
    checked against the plan's scales, `check_force_bits`)."""
    n = n_scales
    for name, value in (("cfg", cfg), ("tau", tau)):
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise ValueError(f"{name} has {len(value)} per-scale values, but the scale schedule has {n} scales: "
                             f"give one number or exactly {n}")
    if cfg_stop_scale is not None and not 0 <= cfg_stop_scale <= n:
        raise bad("cfg_stop_scale", cfg_stop_scale, f"use a scale index 0..{n - 1}, {n} or None (no stop)")
    if not (cfg_insertion_layer in (0, 1) or -depth < cfg_insertion_layer < 0):
        raise bad("cfg_insertion_layer", cfg_insertion_layer, f"use 0 (guide logits), 1 (no guidance mixing) "
                  f"or a negative layer offset in -{depth - 1}..-1")


def check_force_bits(force_bits, shapes: list[tuple[int, int, int, int]]) -> None:
    """Forced bits: a list over the scales that run (the first ones), each (B, h, w, d) of 0 and 1, or None."""
    if force_bits is None:
        return
    if not isinstance(force_bits, (list, tuple)) or len(force_bits) > len(shapes):
        count = f"{len(force_bits)} entries" if isinstance(force_bits, (list, tuple)) else show(force_bits)
        raise ValueError(f"force_bits={count} is invalid: use a list of at most {len(shapes)} tensors "
                         "(one per scale that runs, from the first) or None")
    for step, bits in enumerate(force_bits):
        name = f"force_bits[{step}]"
        if bits is None:
            continue
        if not isinstance(bits, torch.Tensor) or bits.is_floating_point() or bits.is_complex():
            raise bad(name, bits, "use an integer or bool tensor of 0 and 1")
        if tuple(bits.shape) != shapes[step]:
            raise bad(name, bits, f"expected shape {shapes[step]} (batch, h, w, bits) at this scale")
        if bits.numel() and not ((bits == 0) | (bits == 1)).all():
            raise bad(name, bits, "every value must be 0 or 1")


# --------------------------------------------------------------------------------------------------
# The one-line message
# --------------------------------------------------------------------------------------------------
def show(value, limit: int = 60) -> str:
    """A one-line, printable repr of a value, shortened (prompts can be long; lone surrogates escaped)."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={show(value)} is invalid: {allowed}")


# ==================================================================================================
# Memory
#
# Estimate a generation's peak memory before running it, and refuse what cannot fit.
#
# A 2048x2048 image has 16k tokens at its last scale; its KV cache, activations and the VAE decoder's
# full-resolution feature maps can exceed the machine. Finding that out by an out-of-memory kill
# loses the process, so `check_memory` compares an estimate (in float32, the compute dtype here) with
# what the device has available and raises one clear `MemoryError` instead.
# ==================================================================================================
GiB = 1024**3
F32 = 4


@dataclass
class MemoryEstimate:
    kv_cache: int
    activations: int
    vae_decode: int
    joined_kv: int = 0  # of the activations: the last scale's joined keys and values, in the largest layer

    def describe(self) -> str:
        parts = dict(kv_cache=self.kv_cache, activations=self.activations, vae_decode=self.vae_decode)
        return ", ".join(f"{k.replace('_', ' ')} {v / GiB:.1f}" for k, v in parts.items())


def kv_cache_bytes(p: Plan, cfg: InfinityConfig, rows: int, itemsize: int = F32) -> int:
    """Bytes of the preallocated KV caches of plan `p` (sampling.make_caches), `itemsize` bytes per
    value (2 for bf16 caches)."""
    return 2 * rows * sum(p.kv_tokens) * cfg.embed_dim * itemsize


def restore_cache_bytes(p: Plan, cfg: InfinityConfig, images: int, itemsize: int = F32) -> int:
    """Bytes of pruning's restoration cache (`pruning.Pruner`): three sub-layer outputs per layer of the
    plan, for the rows the cache scale ran (one half of them when guidance stopped before it). Past a later
    stop it keeps its full rows: the rows that run on are a view of it."""
    if p.prune.cache_scale is None:
        return 0
    rows = images * (2 if p.steps[p.prune.cache_scale].guided else 1)
    return 3 * rows * sum(p.restored) * cfg.embed_dim * itemsize


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


def estimate(p: Plan, cfg: InfinityConfig, vae_cfg, images: int, kv_itemsize: int = F32) -> MemoryEstimate:
    """Peak bytes of plan `p`: the KV caches (allocated for every CFG row even with a CFG stop: later
    scales use a view), the activations of the largest scale that runs, and the VAE decoder.

    Activations: the residual stream and sub-layer temporaries, the FFN hidden layer, the last scale's
    joined keys and values (`KVCache.extend` at the last scale, which is not stored: every cached key
    plus its own, in the layer that joins most: a layer window prunes only some layers), logits, and the
    restoration cache. Past the CFG stop the scale runs on one half of the rows.
    """
    rows = images * (2 if p.cfg_on else 1)
    big = max(p.ran, key=lambda s: s.hw[0] * s.hw[1])
    L, run_rows = big.hw[0] * big.hw[1], images * (2 if big.guided else 1)
    stream = run_rows * L * (8 * cfg.embed_dim + 2 * cfg.ffn_hidden)
    logits = 4 * images * L * 2 * cfg.d_vae
    joined_rows = images * (2 if p.ran[-1].guided else 1)
    joined = 2 * joined_rows * max(sum(s.kept[li] for s in p.ran) for li in range(cfg.depth)) * cfg.embed_dim * F32
    activations = (stream + logits) * F32 + joined + restore_cache_bytes(p, cfg, images)
    return MemoryEstimate(kv_cache_bytes(p, cfg, rows, kv_itemsize), activations,
                          vae_decode_bytes(vae_cfg, p.scales, images, cfg.spatial_patchify), joined)


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
    total = est.kv_cache + est.activations + est.vae_decode
    if total > free:
        raise MemoryError(f"{what} needs about {total / GiB:.1f} GiB ({est.describe()} GiB) but "
                          f"{free / GiB:.1f} GiB is available; use prune=True, a lower res, fewer prompts "
                          "or a larger device")


# --------------------------------------------------------------------------------------------------
# Memory-mapped weights. Loading keeps weights in the file's pages (torch.load(mmap=True), safetensors):
# the kernel reads a page on first touch and counts it in the process's RSS from then on. A model that
# is done for this generation (T5 after encoding, the transformer before decoding) can hand its pages
# back: they leave the process but stay in the page cache, so the next touch is a cheap minor fault.
# --------------------------------------------------------------------------------------------------
@dataclass
class Mapping:
    start: int
    end: int
    path: str           # "" for anonymous memory (the heap, torch's allocations)
    stats: dict[str, int] = field(default_factory=dict)  # the kB counters of smaps: Rss, Anonymous, ...


def mappings() -> list[Mapping]:
    """The process's memory mappings with their counters, from /proc/self/smaps (empty where there is no /proc)."""
    out = []
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                    start, end = (int(a, 16) for a in fields[0].split("-"))
                    path = fields[5].strip() if len(fields) > 5 else ""
                    out.append(Mapping(start, end, path if path.startswith("/") else ""))
                elif out and line.rstrip().endswith("kB"):
                    out[-1].stats[fields[0].rstrip(":")] = int(fields[1])
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
    tensors = [*module.parameters(), *module.buffers()]
    if not tensors or tensors[0].device.type != "cpu":  # only CPU weights are memory-mapped
        return 0
    maps = mappings()
    files = {m.start: m for t in tensors if (m := mapping_of(t, maps)) is not None}
    dropped = 0
    for m in files.values():
        if not m.stats.get("Anonymous", 1) and drop_pages(m):
            dropped += m.stats.get("Rss", 0) * 1024
    return dropped


def drop_pages(m: Mapping) -> bool:
    """madvise(MADV_DONTNEED) over a whole mapping. Safe for clean private file pages and for shared
    file mappings (written pages stay in the page cache); it would lose a private mapping's writes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(m.start), ctypes.c_size_t(m.end - m.start), MADV_DONTNEED) == 0


MADV_DONTNEED = 4
