"""The public Infinity checkpoints: their key names, and loading one into `Infinity`.

Upstream groups blocks as `block_chunks.{c}.module.{i}` (c * blocks_per_chunk + i is the layer), and
training wrappers (DDP, torch.compile) may prefix every key; minivar's blocks are a flat `blocks.{n}`.
The mapping is computed from the keys themselves, so any chunk size loads, and errors name tensors as
the file names them.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .config import InfinityConfig
from .transformer import Infinity
from .weights import CheckpointError, assign_state_dict, check_size, read_state_dict

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
    """Build on the meta device and assign the checkpoint's tensors (.pth, .safetensors or shard index).
    `config_name` says where `cfg` came from, for the error that refuses a config far larger than the file."""
    from .flops import param_count  # flops imports the model's neighbours; import it only when loading

    raw = read_state_dict(path, what="Infinity checkpoint")
    names = file_key_names(raw)
    sd = {name: raw[key] for name, key in names.items()}
    source = f"Infinity checkpoint {path}"
    if strict:
        check_size(param_count(cfg), sd, source, f"{config_name} (depth={cfg.depth}, embed_dim={cfg.embed_dim}, "
                   f"text_channels={cfg.text_channels}, text_maxlen={cfg.text_maxlen})", dtype)
    with torch.device("meta"):
        model = Infinity(cfg)
    assign_state_dict(model, sd, source, dtype=dtype, device=device, strict=strict,
                      file_name=file_namer(names))
    return model.eval().requires_grad_(False)
