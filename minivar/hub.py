"""Model registry: which files make up each preset, where they live, and how to fetch them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import PRESETS, InfinityConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo: str                      # Hugging Face repo of the transformer and VAE
    transformer: str               # file (or shard index) inside `repo`
    vae: str
    vae_config: str                # VAE preset name, or a JSON file next to the weights
    text_encoder_repo: str
    config: InfinityConfig | str   # preset config, or a JSON file next to the weights


SPECS: dict[str, ModelSpec] = {
    "infinity-2b": ModelSpec("infinity-2b", "FoundationVision/Infinity", "infinity_2b_reg.pth",
                             "infinity_vae_d32reg.pth", "d32", "google/flan-t5-xl", PRESETS["infinity-2b"]),
    "infinity-8b": ModelSpec("infinity-8b", "FoundationVision/Infinity",
                             "infinity_8b_weights/model.safetensors.index.json",
                             "infinity_vae_d56_f8_14_patchify.pth", "d56", "google/flan-t5-xl", PRESETS["infinity-8b"]),
}


def weights_home() -> Path:
    """Where weights live: $MINIVAR_HOME, else the checkout's weights/ folder."""
    return Path(os.environ.get("MINIVAR_HOME", REPO_ROOT / "weights")).expanduser()


@dataclass
class Files:
    name: str
    transformer: Path
    vae: Path
    vae_config: object
    text_encoder: Path
    config: object


def resolve_files(name: str | None, *, transformer=None, vae=None, text_encoder=None, config=None,
                  vae_config=None) -> Files:
    """Explicit paths win; a preset name fills in the rest from local files."""
    if name is None:
        missing = [k for k, v in dict(transformer=transformer, vae=vae, text_encoder=text_encoder,
                                      config=config, vae_config=vae_config).items() if v is None]
        if missing:
            raise ValueError(f"minivar.load() needs a model name ({sorted(SPECS)}) or all of: {missing}")
        return Files("custom", Path(transformer), Path(vae), vae_config, Path(text_encoder), config)
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(SPECS)} or pass file paths")
    spec = SPECS[name]
    home = weights_home() / name
    return Files(name, Path(transformer or home / spec.transformer), Path(vae or home / spec.vae),
                 vae_config or spec.vae_config, Path(text_encoder or home / "flan-t5-xl"), config or spec.config)
