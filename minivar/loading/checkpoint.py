"""Loading the three models from their files: the Infinity transformer, the BSQ VAE and the T5 encoder.

Each loader builds its model on the meta device and assigns the file's tensors to it (weights.py),
strictly: any missing, unexpected or mis-shaped tensor is one CheckpointError naming the file.

The Infinity checkpoints:

Upstream groups blocks as `block_chunks.{c}.module.{i}` (c * blocks_per_chunk + i is the layer), and
training wrappers (DDP, torch.compile) may prefix every key; minivar's blocks are a flat `blocks.{n}`.
The mapping is computed from the keys themselves, so any chunk size loads, and errors name tensors as
the file names them.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..model.config import InfinityConfig
from ..model.t5 import TIED_EMBEDDING, T5Config, T5Encoder, is_encoder_key
from ..model.transformer import Infinity
from ..model.vae import FLAT_KEY_RULES, VAE_PRESETS, BSQVAE, VAEConfig, make_mask
from .weights import (CheckpointError, assign_state_dict, check_size, read_pth, read_state_dict, remap_names,
                      shard_files)

# --------------------------------------------------------------------------------------------------
# Upstream groups blocks as block_chunks.{c}.module.{i} (c * blocks_per_chunk + i is the layer);
# training wrappers may prefix every key. Buffers that older checkpoints carry but no model uses are dropped.
CHECKPOINT_PREFIXES = ("module.", "_orig_mod.")
UNUSED_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
BLOCK_CHUNK_KEY = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.*)$")


def strip_wrappers(key: str) -> str:
    """`module._orig_mod.head.weight` -> `head.weight`: DDP and torch.compile wrappers, in any nesting."""
    while key.startswith(CHECKPOINT_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def file_key_names(keys: Iterable[str]) -> dict[str, str]:
    """minivar's name of every tensor -> the name the checkpoint file gives it.

    Wrapper prefixes are stripped *before* the chunk size is inferred, so `module.block_chunks.0.module.3.x`
    counts as block 3 of chunk 0 (the `.module.` inside a chunk is upstream's own, not a wrapper's).
    """
    stripped = {k: strip_wrappers(k) for k in keys}
    matches = {k: BLOCK_CHUNK_KEY.match(s) for k, s in stripped.items()}
    per_chunk = 1 + max((int(m.group(2)) for m in matches.values() if m), default=-1)
    out: dict[str, str] = {}
    for key, short in stripped.items():
        if short in UNUSED_KEYS:
            continue
        m = matches[key]
        name = f"blocks.{int(m.group(1)) * per_chunk + int(m.group(2))}.{m.group(3)}" if m else short
        if name in out:
            raise CheckpointError(f"the checkpoint holds both {out[name]} and {key}, which name the same tensor "
                                  f"{name}; keep one")
        out[name] = key
    return out


def flatten_block_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map upstream checkpoint keys onto minivar's flat `blocks.{n}` list (chunk size inferred from keys)."""
    return {name: sd[key] for name, key in file_key_names(sd).items()}


def file_namer(names: dict[str, str]) -> Callable[[str], str]:
    """How the file names (or would name, for a missing tensor) each of minivar's keys, for error messages."""
    chunked = [(k, BLOCK_CHUNK_KEY.match(strip_wrappers(k))) for k in names.values()]
    chunked = [(k, m) for k, m in chunked if m]
    prefix = chunked[0][0][: len(chunked[0][0]) - len(strip_wrappers(chunked[0][0]))] if chunked else ""
    per_chunk = 1 + max((int(m.group(2)) for _, m in chunked), default=0)

    def name(key: str) -> str:
        m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        if key in names or not (chunked and m):
            return names.get(key, key)
        n = int(m.group(1))
        return f"{prefix}block_chunks.{n // per_chunk}.module.{n % per_chunk}.{m.group(2)}"

    return name


def load_infinity(path: str | Path, cfg: InfinityConfig, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, strict: bool = True,
                  config_name: str = "the Infinity config") -> Infinity:
    """Build on the meta device and assign the checkpoint's tensors (.pth, .safetensors or shard index);
    the plain model, computing in float32 (`Infinity.set_compute_dtype` and `parity.apply` change that).
    `config_name` says where `cfg` came from, for the error that refuses a config far larger than the file."""
    raw = read_state_dict(path, what="Infinity checkpoint")
    names = file_key_names(raw)
    sd = {name: raw[key] for name, key in names.items()}
    source = f"Infinity checkpoint {path}"
    if strict:
        check_size(cfg.param_count(), sd, source, f"{config_name} (depth={cfg.depth}, embed_dim={cfg.embed_dim}, "
                   f"text_channels={cfg.text_channels}, text_maxlen={cfg.text_maxlen})", dtype)
    with torch.device("meta"):
        model = Infinity(cfg)
    assign_state_dict(model, sd, source, dtype=dtype, device=device, strict=strict,
                      file_name=file_namer(names))
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# The BSQ VAE
# --------------------------------------------------------------------------------------------------
def _resolve_config(config: VAEConfig | str | Path | dict[str, Any]) -> VAEConfig:
    if isinstance(config, VAEConfig):
        return config
    if isinstance(config, str) and config in VAE_PRESETS:
        return VAE_PRESETS[config]
    if isinstance(config, (str, Path)) and not Path(config).is_file():
        raise ValueError(f"VAE config {config!r} is neither a preset {sorted(VAE_PRESETS)} nor a JSON file")
    return VAEConfig.from_upstream_json(config)


def _vae_state_dict(path: str | Path, d: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint ({'vae': sd} or a bare state dict), rename flat keys, add derived buffers.
    Also returns each tensor's name in the file, for error messages."""
    sd = read_state_dict(path, what="VAE checkpoint")
    if isinstance(sd.get("vae"), dict):
        sd = sd["vae"]
    names = remap_names(sd, FLAT_KEY_RULES)
    sd = {new: sd[old] for new, old in names.items()}
    for name in ("quantizer.lfq.mask", "quantize.lfq.mask"):
        sd.setdefault(name, make_mask(d))  # a constant the model can rebuild; some exports drop it
    return sd, names


def load_vae(path: str | Path, config: VAEConfig | str | Path | dict[str, Any], device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> BSQVAE:
    """Build the VAE of `config` (a VAEConfig, a preset name, an upstream JSON path or dict) on the meta
    device and assign the checkpoint's tensors to it (strict: raises CheckpointError on any mismatch)."""
    cfg = _resolve_config(config)
    sd, names = _vae_state_dict(path, cfg.codebook_dim)
    with torch.device("meta"):
        model = BSQVAE(cfg)
    assign_state_dict(model, sd, source=f"VAE checkpoint {path}", dtype=dtype, device=device,
                      file_name=lambda k: names.get(k, k))
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# The T5 encoder: a Hugging Face directory (T5EncoderModel, or the full T5ForConditionalGeneration checkpoint)
# --------------------------------------------------------------------------------------------------
def read_encoder_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The encoder tensors of a model directory: safetensors (single or sharded) or pytorch_model*.bin."""
    if any(path.glob("*.safetensors.index.json")) or any(path.glob("*.safetensors")):
        return read_state_dict(path, is_encoder_key, what="T5 weights")
    if (path / "pytorch_model.bin.index.json").is_file():
        shards = shard_files(path / "pytorch_model.bin.index.json", is_encoder_key)
    elif (path / "pytorch_model.bin").is_file():
        shards = [path / "pytorch_model.bin"]
    else:
        raise CheckpointError(f"T5 directory {path} holds no model*.safetensors or pytorch_model*.bin weights")
    sd = {}
    for shard in shards:
        sd |= {k: v for k, v in read_pth(shard, "T5 weights").items() if is_encoder_key(k)}
    return sd


def tie_embedding(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Give both names of the token embedding the one stored tensor (`shared.weight` if the file has both)."""
    stored = [sd[k] for k in TIED_EMBEDDING if k in sd]
    if not stored:
        raise CheckpointError(f"{source} has no token embedding (neither {' nor '.join(TIED_EMBEDDING)})")
    return sd | dict.fromkeys(TIED_EMBEDDING, stored[0])


def set_dtype(model: T5Encoder, dtype: torch.dtype) -> T5Encoder:
    """Cast to `dtype`, except that in float16 the FFN output projections stay float32.

    flan-t5's FFN outputs overflow float16. The reference implementation keeps `wo` in float32 then, which also
    turns the residual stream into float32 from the first FFN on; we reproduce that, numerics included.
    """
    model.to(dtype)
    if dtype == torch.float16:
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
    return model


def load_t5(path: str | Path, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = torch.float32) -> T5Encoder:
    """Build the encoder on the meta device and assign the directory's tensors to it (strictly).
    `dtype=None` keeps the dtype the files store (flan-t5-xl: float32), memory-mapped, without a copy."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"T5 model directory not found: {path} "
                              "(check the path, or run `minivar download MODEL`)")
    cfg = T5Config.from_json(path / "config.json")
    sd = tie_embedding(read_encoder_tensors(path), str(path))
    described = (f"the T5 config {path / 'config.json'} (num_layers={cfg.num_layers}, d_model={cfg.d_model}, "
                 f"d_ff={cfg.d_ff}, vocab_size={cfg.vocab_size})")
    check_size(cfg.param_count(), sd, f"T5 weights in {path}", described, dtype)
    with torch.device("meta"):
        model = T5Encoder(cfg) if dtype is None else set_dtype(T5Encoder(cfg), dtype)
    if dtype is not None:  # each tensor to its parameter's dtype (in float16 `set_dtype` keeps some float32)
        want = model.state_dict()
        sd = {k: v.to(want[k].dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k in want
              and want[k].is_floating_point() else v for k, v in sd.items()}
    assign_state_dict(model, sd, f"T5 weights in {path}", device=device, strict=True)
    return model.eval()
