"""Reading checkpoint files and assigning them to modules built on the meta device.

Every model in minivar is built on the meta device (no memory), then receives the tensors read from
disk with `load_state_dict(assign=True)`, so the weights exist exactly once. Files are read lazily:
`.pth` with `torch.load(weights_only=True, mmap=True)` (never arbitrary unpickling), safetensors with
`safe_open`, sharded safetensors through their `*.index.json`.

Everything that goes wrong while loading raises `CheckpointError`: one line that says which file, what
is wrong, and what to do.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model it is loaded into."""


def _require(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path} (check the path, or run `minivar download MODEL`)")
    return path


def read_pth(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.bin` state dict safely (weights_only) and memory-mapped."""
    path = _require(Path(path), what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what} {path} is truncated or not a PyTorch checkpoint ({first[:160]}); "
                              "re-download or re-convert it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def read_safetensors(paths: Iterable[str | Path], keep: Callable[[str], bool] = lambda k: True,
                     what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read the tensors whose names pass `keep` from one or more safetensors files (lazily)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for p in paths:
        p = _require(Path(p), what)
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                for k in f.keys():
                    if keep(k):
                        out[k] = f.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{what} {p} is truncated or not a safetensors file ({e}); "
                                  "re-download or re-convert it") from None
    return out


def shard_files(index_path: str | Path, keep: Callable[[str], bool] = lambda k: True) -> list[Path]:
    """The shard files named by a `*.safetensors.index.json` that hold at least one wanted tensor."""
    index_path = _require(Path(index_path), "shard index")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"shard index {index_path} is not a valid index.json ({e})") from None
    names = sorted({f for k, f in weight_map.items() if keep(k)})
    return [index_path.parent / n for n in names]


def read_state_dict(path: str | Path, keep: Callable[[str], bool] = lambda k: True,
                    what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict from a `.pth`/`.bin`, a `.safetensors`, a shard index, or a directory of shards."""
    path = _require(Path(path), what)
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if index:
            path = index[0]
        elif singles:
            return read_safetensors(singles, keep, what)
        else:
            raise CheckpointError(f"{what} directory {path} holds no .safetensors files or index")
    if path.name.endswith(".index.json"):
        return read_safetensors(shard_files(path, keep), keep, what)
    if path.suffix == ".safetensors":
        return read_safetensors([path], keep, what)
    sd = read_pth(path, what)
    return {k: v for k, v in sd.items() if keep(k)}


def remap_keys(sd: dict[str, torch.Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply regex `(pattern, replacement)` rules, in order, to every key."""
    import re

    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in sd.items():
        for pat, rep in compiled:
            k = pat.sub(rep, k)
        out[k] = v
    return out


def _summarise(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
                     strict: bool = True) -> None:
    """Raise one CheckpointError listing missing / unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_summarise(shapes, 3)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_summarise(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_summarise(unexpected)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__} ({'; '.join(problems)}); "
                              "is it the checkpoint of another model or config?")


def assign_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
                      dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                      strict: bool = True) -> nn.Module:
    """Check `sd` against `model` (built on the meta device), then assign its tensors in place.

    Floating tensors are cast to `dtype` when given; everything moves to `device`. Tensors that the
    state dict does not contain (non-strict mode) stay on the meta device and are reported by
    `check_state_dict` in strict mode.
    """
    check_state_dict(model, sd, source, strict)
    expected = model.state_dict()
    ready = {}
    for k, v in sd.items():
        if k not in expected:
            continue
        if v.is_floating_point() and dtype is not None:
            v = v.to(dtype)
        elif v.is_floating_point():
            v = v.to(expected[k].dtype) if expected[k].is_floating_point() else v
        ready[k] = v.to(device)
    model.load_state_dict(ready, strict=strict, assign=True)
    return model
