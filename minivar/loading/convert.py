"""`minivar convert`: Infinity and VAE `.pth` checkpoints -> safetensors.

A `.pth` is a pickle; even read with `weights_only=True` it needs an unpickler. A safetensors file is
a JSON header followed by the raw bytes of every tensor, so a later load maps the file and reads
only what it needs. Loading prefers `x.safetensors` over `x.pth` when both sit side by side
(hub.prefer_converted).

The writer below streams tensor by tensor (peak memory: one tensor, cast to the output dtype) into a
temporary file that is renamed at the end (files.atomic_write), so an interrupted conversion never
leaves a file that looks finished. The output must end in `.safetensors` and must not be the input,
so a checkpoint is never replaced by bytes its name contradicts. Format: 8-byte little-endian header length, the header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with
spaces to a multiple of 8, then the data.

Uses weights.py (reading a `.pth` safely) and files.py (atomic writes); the CLI's `convert` command calls it.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .files import atomic_write, same_file
from .weights import CheckpointError, read_pth

CONVERT_DTYPES: dict[str, torch.dtype | None] = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth` state dict (unwrapping the `{"vae": ...}` nesting some VAE files use)."""
    sd = read_pth(path, "checkpoint to convert")
    if isinstance(sd.get("vae"), dict):
        sd = sd["vae"]
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors at its top level; is it a state dict?")
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (floating ones cast to `dtype` if given) to `path`, one tensor at a time."""
    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    header, offset = {}, 0
    for name, t in tensors.items():
        if out_dtype(t) not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * torch.empty((), dtype=out_dtype(t)).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[out_dtype(t)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f) -> None:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            flat = t.to(out_dtype(t)).contiguous().reshape(-1)
            f.write(flat.view(torch.uint8).numpy())  # little-endian bytes, as safetensors stores them

    return atomic_write(path, write)


def convert(src: str | Path, dst: str | Path | None = None, dtype: str = "keep") -> Path:
    """Convert one `.pth` checkpoint; the output defaults to the same name with `.safetensors`."""
    src = Path(src).expanduser()
    if dtype not in CONVERT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {list(CONVERT_DTYPES)}")
    if src.suffix != ".pth":
        raise ValueError(f"{src} is not a .pth checkpoint (safetensors files need no conversion)")
    dst = output_path(src, dst)
    meta = {"format": "pt", "source": src.name, "converted_by": "minivar convert", "dtype": dtype}
    return write_safetensors(checkpoint_tensors(src), dst, CONVERT_DTYPES[dtype], meta)


def output_path(src: Path, dst: str | Path | None) -> Path:
    """Where `convert` writes: `dst` (a folder takes the input's stem), by default `src` as .safetensors.
    Refuses an output that is the input or whose name says another format."""
    dst = Path(dst).expanduser() if dst is not None else src.with_suffix(".safetensors")
    if dst.is_dir():
        dst = dst / src.with_suffix(".safetensors").name
    if same_file(src, dst):
        raise ValueError(f"output {dst} is the input {src}: converting in place would destroy the checkpoint; "
                         "write to a .safetensors file")
    if dst.suffix != ".safetensors":
        raise ValueError(f"output {dst} must end in .safetensors: convert writes safetensors, and loading goes "
                         "by the file's extension")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output folder {dst.parent} does not exist")
    return dst


def convert_targets(target: str) -> list[Path]:
    """The `.pth` files a command-line target means: a file, a model directory, or a preset's files."""
    from .hub import SPECS, weights_home

    path = Path(target).expanduser()
    if path.is_file():
        return [path]
    if target in SPECS:
        spec = SPECS[target]
        candidates = [weights_home() / spec.name / spec.transformer, weights_home() / spec.name / spec.vae]
    elif path.is_dir():
        candidates = [path / "infinity.pth", path / "vae.pth"]
    else:
        raise ValueError(f"nothing to convert at {target!r}: give a .pth file, a model directory or a preset name")
    found = [p for p in candidates if p.suffix == ".pth" and p.is_file()]
    if not found:
        raise FileNotFoundError(f"no .pth checkpoint to convert for {target!r} (looked for "
                                f"{', '.join(str(p) for p in candidates if p.suffix == '.pth')})")
    return found
