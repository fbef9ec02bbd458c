"""Reading checkpoint files and assigning them to modules built on the meta device.

Every model in minivar is built on the meta device (no memory), then receives the tensors read from
disk with `load_state_dict(assign=True)`, so the weights exist exactly once. Files are read lazily:
`.pth` with `torch.load(weights_only=True, mmap=True)` (never arbitrary unpickling), safetensors with
`safe_open`, sharded safetensors through their `*.index.json`.

Everything that goes wrong while loading raises `CheckpointError`: one line that says which file, what
is wrong, and what to do.
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..model.config import CheckpointError, read_json_object, require_file


def read_pth(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.bin` state dict safely (weights_only) and memory-mapped."""
    path = require_file(Path(path), what)
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
        p = require_file(Path(p), what)
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                for k in f.keys():
                    if keep(k):
                        out[k] = f.get_tensor(k)
        except (SafetensorError, OSError) as e:
            why = " ".join(str(e).split())
            why = why[:200] + ("..." if len(why) > 200 else "")
            raise CheckpointError(f"{what} {p} is damaged, truncated or not a safetensors file ({why}); "
                                  "re-download or re-convert it") from None
    return out


def shard_files(index_path: str | Path, keep: Callable[[str], bool] = lambda k: True) -> list[Path]:
    """The shard files named by a `*.safetensors.index.json` that hold at least one wanted tensor."""
    index_path = Path(index_path)
    weight_map = read_json_object(index_path, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"shard index {index_path} is not a valid index.json (it needs a \"weight_map\" object "
                              "from tensor names to shard file names)")
    names = sorted({f for k, f in weight_map.items() if keep(k)})
    for n in names:  # a shard lies next to its index: no absolute paths, no way out of the folder
        if Path(n).is_absolute() or ".." in Path(n).parts or not n.endswith((".safetensors", ".bin")):
            raise CheckpointError(f"shard index {index_path} names the shard {n!r}; shards are .safetensors or "
                                  ".bin files inside the index's folder")
    return [index_path.parent / n for n in names]


def read_state_dict(path: str | Path, keep: Callable[[str], bool] = lambda k: True,
                    what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict from a `.pth`/`.bin`, a `.safetensors`, a shard index, or a directory of shards."""
    path = require_file(Path(path), what)
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


def remap_names(keys: Iterable[str], rules: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Apply regex `(pattern, replacement)` rules, in order, to every key: new name -> the file's name."""
    import re

    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key in keys:
        name = key
        for pat, rep in compiled:
            name = pat.sub(rep, name)
        out[name] = key
    return out


def _summarise(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _same_kind(stored: torch.Tensor, wanted: torch.Tensor) -> bool:
    """Floating tensors go to floating parameters, integer and bool buffers keep their exact dtype."""
    if wanted.is_floating_point():
        return stored.is_floating_point()
    return stored.dtype == wanted.dtype


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, strict: bool = True,
                     file_name: Callable[[str], str] = lambda k: k) -> None:
    """Raise one CheckpointError listing missing / unexpected keys, shape and dtype mismatches.

    Keys are named as the file names them (`file_name` maps minivar's name to the file's), with
    minivar's own name beside it when the two differ.
    """
    def named(k: str) -> str:
        return file_name(k) if file_name(k) == k else f"{file_name(k)} (minivar: {k})"

    expected = model.state_dict()
    missing = [named(k) for k in expected if k not in sd]
    unexpected = [named(k) for k in sd if k not in expected]
    present = [k for k in expected if k in sd]
    not_tensors = [f"{named(k)} is a {type(sd[k]).__name__}" for k in present if not isinstance(sd[k], torch.Tensor)]
    present = [k for k in present if isinstance(sd[k], torch.Tensor)]
    shapes = [f"{named(k)} {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in present if tuple(sd[k].shape) != tuple(expected[k].shape)]
    dtypes = [f"{named(k)} {str(sd[k].dtype).removeprefix('torch.')} vs model "
              f"{str(expected[k].dtype).removeprefix('torch.')}" for k in present if not _same_kind(sd[k], expected[k])]
    problems = []
    if not_tensors:
        problems.append(f"{len(not_tensors)} value(s) that are not tensors: {_summarise(not_tensors, 3)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_summarise(shapes, 3)}")
    if dtypes:
        problems.append(f"{len(dtypes)} dtype mismatch(es): {_summarise(dtypes, 3)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_summarise(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_summarise(unexpected)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__} ({'; '.join(problems)}); "
                              "is it the checkpoint of another model or config, or a damaged file?")


def check_size(params: int, sd: dict[str, torch.Tensor], source: str, config: str,
               dtype: torch.dtype | None) -> None:
    """Refuse a config that describes far more weights than the checkpoint holds, before building the model
    (an absurd depth would otherwise take minutes and gigabytes just to build on the meta device). Near
    misses pass, so that `check_state_dict` can name the tensors that differ."""
    stored = sum(v.numel() for v in sd.values() if isinstance(v, torch.Tensor))
    if stored == 0:
        raise CheckpointError(f"{source} holds no tensors at its top level (its keys: {_summarise(list(sd))}); "
                              "is it the checkpoint of another model?")
    if params > 4 * stored:
        dtype = dtype or torch.float32
        need = params * torch.empty((), dtype=dtype).element_size()
        raise CheckpointError(f"{config} describes {params:,} parameters (~{need / 2**30:,.1f} GiB of weights in "
                              f"{str(dtype).removeprefix('torch.')}) but {source} holds only {stored:,} values; "
                              "the config does not describe this checkpoint (check its numbers)")


def assign_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
                      dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                      strict: bool = True, file_name: Callable[[str], str] = lambda k: k) -> nn.Module:
    """Check `sd` against `model` (built on the meta device), then assign its tensors in place.

    Floating tensors are cast to `dtype` when given, and otherwise keep the dtype they are stored in;
    everything moves to `device`. A tensor already in that dtype and on that device is assigned as
    it is: a memory-mapped file stays mapped, with no copy. Tensors that the state dict does not
    contain (non-strict mode) stay on the meta device and are reported by `check_state_dict` in
    strict mode.
    """
    check_state_dict(model, sd, source, strict, file_name)
    expected = model.state_dict()
    ready = {}
    for k, v in sd.items():
        if k not in expected:
            continue
        if v.is_floating_point() and dtype is not None:
            v = v.to(dtype)
        ready[k] = v.to(device)
    model.load_state_dict(ready, strict=strict, assign=True)
    return model
