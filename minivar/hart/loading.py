"""Loading a HART checkpoint folder: `llm/` (the transformer) and `tokenizer/` (the VQ tokenizer).

Each part has a `config.json` (upstream's `HARTForT2IConfig` / `HARTAutoEncoderWithDiscConfig`) and a
state dict: `llm/ema_model.bin` (the EMA weights upstream samples with), else `llm/model.safetensors`
or `llm/pytorch_model.bin`; `tokenizer/model.safetensors` or `tokenizer/pytorch_model.bin`. Both models
are built on the meta device and receive the file's tensors strictly (../loading/weights.py), after the
tensors that step 1 does not use are set aside by name (`STEP2_OR_UNUSED`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..loading.weights import CheckpointError, assign_state_dict, read_state_dict
from ..model.config import read_json_object
from .config import HartConfig, VQConfig
from .transformer import Hart
from .vq import HartVQ

# Not read by the discrete path: the diffusion MLP and its input norm (step 2), the training-time
# mask buffers, and the tokenizer's encoder side, codebook statistics and GAN discriminator.
STEP2_OR_UNUSED = {
    "llm": ("diffloss.", "decoder_norm.", "attn_bias_for_masking", "lvl_1L"),
    "tokenizer": ("encoder.", "quant_conv.", "quantize.ema_vocab_hit_SV", "disc."),
}
WEIGHT_FILES = {"llm": ("ema_model.bin", "model.safetensors", "pytorch_model.bin"),
                "tokenizer": ("model.safetensors", "pytorch_model.bin")}


def weight_file(folder: Path, part: str) -> Path:
    for name in WEIGHT_FILES[part]:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"HART {part} folder {folder} holds none of {', '.join(WEIGHT_FILES[part])}")


def used_name(part: str, key: str) -> str | None:
    """minivar's name of a checkpoint key of `part` ("llm" or "tokenizer"), or None if step 1 does not use it."""
    name = key.removeprefix("vae.") if part == "tokenizer" else key
    return None if name.startswith(STEP2_OR_UNUSED[part]) else name


def read_part(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """The tensors of one part that the discrete path uses, named as minivar names them (no `vae.`)."""
    sd = read_state_dict(weight_file(folder, part), what=f"HART {part} checkpoint")
    return {name: value for key, value in sd.items() if (name := used_name(part, key)) is not None}


def load_configs(root: str | Path) -> tuple[HartConfig, VQConfig]:
    root = Path(root)
    vq = VQConfig.from_upstream(read_json_object(root / "tokenizer" / "config.json", "HART tokenizer config"))
    return HartConfig.from_upstream(read_json_object(root / "llm" / "config.json", "HART transformer config"), vq), vq


def load_hart(root: str | Path, dtype: torch.dtype | None = None) -> tuple[Hart, HartVQ]:
    """The transformer and the tokenizer of a HART folder (`root/llm`, `root/tokenizer`), ready for `generate`."""
    root = Path(root)
    cfg, vq_cfg = load_configs(root)
    with torch.device("meta"):
        model, vq = Hart(cfg), HartVQ(vq_cfg)
    assign_state_dict(model, read_part(root / "llm", "llm"), f"HART transformer {root / 'llm'}", dtype)
    assign_state_dict(vq, read_part(root / "tokenizer", "tokenizer"), f"HART tokenizer {root / 'tokenizer'}", dtype)
    return model.eval().requires_grad_(False), vq.eval().requires_grad_(False)
