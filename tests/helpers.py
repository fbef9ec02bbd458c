"""Shared helpers for the tests: loading the tiny-a fixture pipeline and comparing against it."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import minivar
from conftest import rel_err  # noqa: F401  (re-exported for the tests)

TINY = Path(__file__).parent / "fixtures" / "tiny-a"
PROMPT = "a red apple on a wooden table"  # the prompt every tiny-a run used
SETTINGS = dict(cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=1)


def load_tiny(**kwargs) -> minivar.Pipeline:
    """A fresh tiny-a pipeline; `kwargs` go to `minivar.load` (device, dtype)."""
    return minivar.load(transformer=TINY / "infinity.pth", vae=TINY / "vae.pth", text_encoder=TINY / "t5",
                        config=TINY / "infinity_config.json", vae_config=TINY / "vae_config.json", **kwargs)


@lru_cache(maxsize=None)
def tiny_pipeline() -> minivar.Pipeline:
    return load_tiny()


@lru_cache(maxsize=None)
def fixture(name: str) -> dict:
    return torch.load(TINY / f"{name}.pt", weights_only=True)


def fixture_bits(run: dict) -> list[torch.Tensor]:
    """The run's bits in trace layout (B, h, w, d) int64, for the scales that ran."""
    return [run[f"bits_{si}"].long().squeeze(1) for si in run["ran_scales"].tolist()]


def fixture_rgb(name: str) -> np.ndarray:
    run = fixture(name)
    if "img_bgr" in run:
        return run["img_bgr"][0].flip(-1).numpy()
    return np.asarray(Image.open(TINY / f"{name}_rgb.png"))


def max_level_diff(img: Image.Image, ref: np.ndarray) -> int:
    return int(np.abs(np.asarray(img).astype(int) - ref.astype(int)).max())
