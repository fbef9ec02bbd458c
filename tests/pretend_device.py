"""A pretend accelerator for CPU test runs: CUDA's device rules, enforced op by op, on real CPU numbers.

A generation that works on the CPU can still fail on a GPU: a tensor created without `device=` stays
on the CPU and meets a GPU tensor in an op, a generator made on the CPU is handed to a GPU sampler, or
a float64 tensor reaches a device that has no float64 (Apple's MPS). CPU-only CI never sees these.

`pretend_device()` is a context in which a module moved `.to(PRETEND)` reports a non-CPU device while
its values stay on the CPU and every op still computes real numbers:

* `OnDevice` wraps a CPU tensor and reports `PRETEND` as its device; code that creates tensors with
  `device=x.device` gets `OnDevice` tensors, code that forgets the device gets plain CPU tensors.
* `DeviceCheck` (a TorchDispatchMode) sees every ATen op. It raises `DeviceMix` when an op's tensor
  arguments (or its generator) sit on two devices, with CUDA's one exception: a 0-dim CPU tensor passes
  as a scalar. It is stricter than CUDA in two places, both hidden host-device transfers: a CPU index
  into a device tensor, and `copy_` across devices. It raises `Float64OnDevice` for a float64 result on
  the device, and records the functions that create float64 tensors on the CPU (`cpu_float64`).
* `torch.tensor(data, device=...)` never reaches a dispatch mode, so a TorchFunctionMode routes it
  (and `as_tensor`, `new_tensor`) through `.to(device)`.
* `torch.Generator(device=PRETEND)` gives a `PretendGenerator` (a CPU generator that counts as one on
  the device), since no accelerator generator can be made without the accelerator.

Why not the meta device itself: it has no values, so sampling, pruning's top-k and every
data-dependent step would run on garbage, no image could be decoded, and a generator cannot be made on
it. Why the `meta` label: the wrapper must claim a device that torch accepts without its backend (a
CPU-only build refuses to create even a wrapper that claims CUDA or MPS). ATen's composite ops then take
their non-CPU branches (GroupNorm on a contiguous copy, SDPA's math kernel), so results agree with a CPU
run up to rounding, not bit for bit. A real meta tensor reaching an op (made by some path this module
misses) is reported as a third device rather than computed on.
"""
from __future__ import annotations

import traceback
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

PRETEND = torch.device("meta")
CPU = torch.device("cpu")
REAL_GENERATOR = torch.Generator


class DeviceMix(RuntimeError):
    pass


class Float64OnDevice(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A CPU tensor `elem` that reports the pretend device."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                device=PRETEND, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a pretend-device tensor outside `pretend_device()`")

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"


class PretendGenerator(REAL_GENERATOR):
    """A CPU generator that counts as one made on the pretend device."""

    def manual_seed(self, seed: int) -> PretendGenerator:
        super().manual_seed(seed)
        return self  # torch's returns a plain Generator object


class GeneratorMeta(type):
    """`torch.Generator` inside `pretend_device()`: `torch.Generator(device=PRETEND)` gives a
    `PretendGenerator`, anything else a real generator, and isinstance checks still see real ones."""

    def __call__(cls, device=None) -> torch.Generator:
        if device is not None and torch.device(device) == PRETEND:
            return PretendGenerator()
        return REAL_GENERATOR() if device is None else REAL_GENERATOR(device)

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, REAL_GENERATOR)


class Generator(metaclass=GeneratorMeta):
    pass


def place(x) -> str:
    """Where a tensor or generator lives: "device" for the pretend one, else torch's device name."""
    if isinstance(x, (OnDevice, PretendGenerator)):
        return "device"
    return str(x.device)


def counts(x) -> bool:
    """Whether x takes part in the same-device rule: every argument but a 0-dim CPU tensor (a scalar)."""
    return not (isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) and x.device == CPU and x.dim() == 0)


class DeviceCheck(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0
        self.cpu_float64: set[str] = set()  # functions of minivar that created a float64 tensor on the CPU

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        inputs = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        where = {place(x) for x in inputs if counts(x)}
        if len(where) > 1:
            shapes = [f"{place(x)} {tuple(x.shape)} {x.dtype}" for x in inputs]
            raise DeviceMix(f"{func} mixes devices {sorted(where)}: {', '.join(shapes)}")
        on_device = where == {"device"}
        if kwargs.get("device") is not None:  # a factory, or .to(device)
            on_device = torch.device(kwargs["device"]) == PRETEND
            kwargs = {**kwargs, "device": CPU}
        unwrap = lambda x: x.elem if isinstance(x, OnDevice) else x  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.float64(func, on_device)
        return tree_map(lambda t: OnDevice(t) if on_device and isinstance(t, torch.Tensor) else t, out)

    def float64(self, func, on_device: bool) -> None:
        if on_device:
            raise Float64OnDevice(f"{func} made a float64 tensor on the device (MPS has no float64)")
        frames = [f.name for f in traceback.extract_stack() if "/minivar/" in f.filename]
        self.cpu_float64.add(frames[-1] if frames else "<outside minivar>")


DATA_FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor)


class PythonLevel(TorchFunctionMode):
    """What the dispatcher cannot see. `torch.tensor(data, device=PRETEND)` and kin are made on the CPU,
    then moved (which DeviceCheck sees). A generator must sit where the op's tensors (or its `device`)
    are; below this level every generator object looks like a CPU one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("generator") is not None:
            check_generator(func, kwargs["generator"], args, kwargs)
        if func in DATA_FACTORIES:
            device = kwargs.get("device", args[0].device if func is torch.Tensor.new_tensor else None)
            if device is not None and torch.device(device) == PRETEND:
                return func(*args, **{**kwargs, "device": CPU}).to(PRETEND)
        return func(*args, **kwargs)


def check_generator(func, gen: torch.Generator, args, kwargs) -> None:
    where = {place(x) for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and counts(x)}
    if kwargs.get("device") is not None:
        where.add("device" if torch.device(kwargs["device"]) == PRETEND else str(torch.device(kwargs["device"])))
    if (where or {"cpu"}) != {place(gen)}:
        raise DeviceMix(f"{func.__name__} draws on {sorted(where or {'cpu'})} from a generator on {place(gen)}")


@contextmanager
def pretend_device():
    """Inside: the device rules are enforced on every op, and `.to(PRETEND)` moves to the pretend device."""
    outer, torch.Generator = torch.Generator, Generator  # the context may be nested
    # Module.to(dtype) would assign `param.data` in place, which changes a wrapper's dtype but not its
    # `elem`; with this flag it makes new parameters instead.
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with PythonLevel(), DeviceCheck() as check:
            yield check
    finally:
        torch.Generator = outer
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def on_cpu(x):
    """A CPU copy of x, or of every tensor in a nested structure (inside `pretend_device()`)."""
    return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, x)
