"""Text -> image: tokenizer and T5, the scale loop, the VAE decoder, behind one `Pipeline`.

    pipe = minivar.load("infinity-2b")                       # or paths to your own files
    out = pipe.generate("a red fox in snow", res=1024, prune=True, seed=1)
    out.image.save("fox.png")
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import memory
from .loading.checkpoint import load_infinity
from .checks import check_against_schedule, check_arguments, check_prompt_text
from .model.config import BUDGETS, HIGH_RES, RES_TO_BUDGET, InfinityConfig, nearest_template, scale_schedule
from .model.numerics import cache_dtype, image_batch
from .model.pruning import model_stages, resolve_prune
from .model.pruning import PruneSchedule
from .model.sampling import Settings, Trace, run_scale_loop
from .loading.checkpoint import load_t5, load_vae
from .model.t5 import T5Encoder
from .model.t5 import Tokenizer
from .model.transformer import Infinity
from .model.vae import BSQVAE, VAEConfig, pixels_to_image


@dataclass
class Output:
    images: list[Image.Image]
    summed_codes: torch.Tensor            # (B, d, H, W) float32: the latent fed to the VAE decoder
    trace: Trace | None
    scales: list[tuple[int, int]]
    prune: PruneSchedule
    timings: dict[str, float] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)  # per scale of `scales`: presets.stages against the model

    @property
    def image(self) -> Image.Image:
        return self.images[0]


class Pipeline:
    def __init__(self, transformer: Infinity, vae: BSQVAE, text_encoder: T5Encoder, tokenizer: Tokenizer,
                 name: str = "custom", device: str | torch.device = "cpu"):
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.name, self.device = name, torch.device(device)

    # ---- text ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[list[torch.Tensor], list[int]]:
        """T5 features of each prompt's real tokens (EOS included): list of (n_i, Ct), and the n_i."""
        ids, mask = self.tokenizer(prompts)
        hidden = self.text_encoder(ids.to(self.device), mask.to(self.device)).float()  # (B, 512, Ct)
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
        scales, template = self.schedule(res, h_div_w), nearest_template(h_div_w)
        schedule = resolve_prune(prune, self.transformer.cfg, scales)
        check_against_schedule(cfg=cfg, tau=tau, cfg_stop_scale=cfg_stop_scale, cfg_insertion_layer=cfg_insertion_layer,
                               force_bits=force_bits, scales=scales, prune=schedule, depth=self.transformer.cfg.depth,
                               d_bits=self.transformer.cfg.d_vae, batch=len(prompts))
        seed = None if seed is None else int(seed)  # numpy integers pass the checks; torch generators need an int
        settings = Settings(cfg, tau, int(top_k), float(top_p), seed, cfg_insertion_layer, cfg_stop_scale, force_bits)
        cfg_on = any(c != 1 for c in settings.per_scale(cfg, len(scales)))
        kv_itemsize = cache_dtype(self.transformer.storage_dtype).itemsize
        need = memory.estimate(self.transformer.cfg, self.vae.cfg, scales, schedule, len(prompts), cfg_on,
                               cfg_stop_scale, kv_itemsize)
        memory.check_memory(need, self.device, f"generating {len(prompts)} image(s) at res={res}")
        times, t0 = {}, time.perf_counter()
        kv, segments = self.text_rows(prompts, negative_prompt, cfg_on)
        self.release(self.text_encoder)  # done with T5 for this call: its mapped pages leave the process
        rec = Trace() if trace else None
        with image_batch(len(prompts)):  # compute small ops image by image: results don't depend on the batch
            cond = self.transformer.condition(kv, segments)
            times["text"] = time.perf_counter() - t0
            summed = run_scale_loop(self.transformer, cond, len(prompts), scales, template, settings, schedule,
                                    rec, progress=scale_progress(progress))
        times["transformer"] = time.perf_counter() - t0 - times["text"]
        self.release(self.transformer)  # its 4 GiB (2B, bf16) of pages are not needed by the decoder
        t1 = time.perf_counter()
        images = self.decode(summed) if output_type == "pil" else []
        self.release(self.vae)
        times["vae"] = time.perf_counter() - t1
        stages = self.stages(scales)
        if rec is not None:
            rec.stage = [stages[si] for si in rec.index]
        return Output(images, summed.squeeze(2).float().contiguous(), rec, scales, schedule, times, stages)

    def stages(self, scales: list[tuple[int, int]]) -> list[str]:
        """The StageVAR stage of each scale (`presets.stages`), against the model's own reference grid."""
        return model_stages(self.transformer.cfg, scales)

    def release(self, module: torch.nn.Module) -> None:
        """Hand back the resident pages of a memory-mapped model (CPU); the next use faults them in again."""
        if self.device.type == "cpu":
            memory.release_mapped(module)

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
    if image.dtype == torch.uint8:
        from .model.vae import image_to_pixels
        return image_to_pixels(image)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected a float image (B, 3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
    return image.float().contiguous()


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
def scale_progress(progress):
    """`progress=True`: a tqdm bar over the scales; a callable wrapping the list of scales is used as is."""
    if progress is True:
        from tqdm.auto import tqdm

        return lambda scales: tqdm(scales, desc="scales", unit="scale", leave=False)
    return progress or None


def load(name: str | Path | None = None, *, transformer: str | Path | None = None, vae: str | Path | None = None,
         text_encoder: str | Path | None = None, config=None, vae_config=None, device: str = "cpu",
         dtype: torch.dtype | None = None, revision: str | None = None) -> Pipeline:
    """Load a pipeline from a preset name ("infinity-2b", "infinity-8b", "toy"), a model directory, or
    explicit files.

    Files given explicitly win over the preset's; missing preset files are downloaded (see hub.py),
    from `revision` of the model repo if given. `dtype=None` keeps every tensor in the dtype its file
    stores, memory-mapped without a copy (Infinity: bf16; flan-t5-xl and the VAEs: float32); a dtype
    casts the transformer to it (`torch.float32` for parity work). On CPU the VAE and T5 are float32
    whatever `dtype` says, and all math runs in float32 (see numerics.py).
    """
    from .loading.hub import resolve_files

    files = resolve_files(name, transformer=transformer, vae=vae, text_encoder=text_encoder,
                          config=config, vae_config=vae_config, revision=revision)
    # On CPU, bf16 is storage only: the transformer upcasts per matmul. The VAE and T5 stay float32
    # (their published dtype, so still mapped): CPU half-precision convolutions and matmuls are very slow.
    side_dtype = torch.float32 if torch.device(device).type == "cpu" else dtype
    vae_model = load_vae(files.vae, files.vae_config, device=device, dtype=side_dtype)
    cfg = files.config
    if not isinstance(cfg, InfinityConfig):
        cfg = InfinityConfig.from_upstream(cfg, d_vae=None)
    cfg = fit_bits_to_vae(cfg, vae_model.cfg)
    config_name = "the Infinity config" + (f" {files.config}" if isinstance(files.config, (str, Path)) else "")
    model = load_infinity(files.transformer, cfg, device=device, dtype=dtype, config_name=config_name)
    t5 = load_t5(files.text_encoder, device=device, dtype=side_dtype)
    return Pipeline(model, vae_model, t5, Tokenizer.from_dir(files.text_encoder), files.name, device)


def fit_bits_to_vae(cfg: InfinityConfig, vae_cfg: VAEConfig) -> InfinityConfig:
    """The transformer's bits per token follow from the VAE (x4 with 2x2 patchify)."""
    from dataclasses import replace

    return replace(cfg, d_vae=vae_cfg.codebook_dim * (4 if cfg.spatial_patchify else 1))


def sample(prompt: str, res: int | None = None, prune=True, model: str = "infinity-2b", device: str = "cpu",
           dtype: torch.dtype | None = None, progress=True, **kwargs) -> Image.Image:
    """One call from a prompt to a PIL image: loads (downloading if needed, then caching) the model,
    then generates with a progress bar over the scales. `model="toy"` runs offline."""
    check_prompt_text("prompt", prompt)  # one prompt, one image (Pipeline.generate takes a list)
    check_arguments(res=res, prune=prune, progress=progress, **kwargs)  # before loading a model
    return cached_pipeline(model, device, dtype).generate(prompt, res=res, prune=prune, progress=progress,
                                                           **kwargs).image


def cached_pipeline(model: str, device: str, dtype: torch.dtype | None) -> Pipeline:
    """The pipeline `sample` uses: loaded once, at most one model kept. Threads asking at the same time
    wait for one load; a pipeline in use by another thread stays valid when the cache moves on."""
    key = (str(model), device, dtype)
    with _PIPELINES_LOCK:
        pipe = _PIPELINES.get(key)
        if pipe is None:
            _PIPELINES.clear()  # keep at most one model in memory
            pipe = _PIPELINES[key] = load(model, device=device, dtype=dtype)
        return pipe


_PIPELINES: dict[tuple[str, str, torch.dtype | None], Pipeline] = {}
_PIPELINES_LOCK = threading.Lock()
