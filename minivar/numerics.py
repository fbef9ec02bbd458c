"""The numerics policy: which dtype a generation computes in, decided once per device at load time.

    minivar.load("infinity-2b", numerics="auto")   # the default; pipe.numerics says what was chosen

| numerics    | products and attention  | T5, VAE            | what it is for                                  |
|-------------|-------------------------|--------------------|-------------------------------------------------|
| "bf16"      | bfloat16                | bfloat16           | speed on CUDA and on CPUs with bf16 matrix units |
| "fp32"      | float32                 | float32            | CPUs without bf16 units (bf16 is slow there)     |
| "reference" | float32 (CPU), bit-     | float32, T5 padded | upstream's CPU numbers bit for bit (parity.py)   |
|             | exact with upstream     | to 512 tokens      |                                                 |
| "auto"      | "bf16" where bf16 is fast on the device (`bf16_is_fast`), else "fp32"                      |

In every mode the weights keep the dtype they are stored in (bf16 for the public Infinity checkpoints,
memory-mapped, no float32 copy): "fp32" upcasts each weight for its product only. "bf16" stores a
float32 file's weights in bf16. Norms, RoPE, the residual stream, guidance and sampling run in float32
in every mode, as they do upstream under autocast.

`bf16_is_fast` reads the CPU's reported features rather than timing a probe: a probe costs a second
or more at every load and is noisy on shared machines, while the features decide the kernels oneDNN
can use. It also honours the kernel limits a user sets (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA),
because bf16 without the bf16 kernels is many times slower than fp32 (and ATen's bf16 attention held
to AVX2 on an AMX CPU stops with "pack_vnni2 is only supported when avx512 is supported").
The environment variable MINIVAR_NUMERICS sets the default for a whole process (the tests use it).
"""
from __future__ import annotations

import os
from contextlib import ExitStack

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

NUMERICS = ("auto", "bf16", "fp32", "reference")
COMPUTE_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32, "reference": torch.float32}
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot-product instructions
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) that still allow its bf16 kernels
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                    "ALL", "DEFAULT", "")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (an empty set where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_is_fast(device: torch.device | str) -> tuple[bool, str]:
    """Whether bf16 products run faster than fp32 on `device`, and why (one line)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA device with bf16 support" if ok else "this CUDA device has no bf16 support"
    if device.type != "cpu":
        return False, f"bf16 speed on {device.type} has not been measured; fp32 is the safe choice"
    units = [f for f in BF16_UNITS if f in cpu_flags()]
    if not units:
        return False, "this CPU reports no bf16 matrix units (neither amx_bf16 nor avx512_bf16)"
    aten = torch.backends.cpu.get_cpu_capability()
    if not aten.startswith("AVX512"):
        return False, f"the CPU has {', '.join(units)} but ATen runs {aten} kernels (ATEN_CPU_CAPABILITY)"
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if isa not in ONEDNN_BF16_ISAS:
        return False, f"the CPU has {', '.join(units)} but oneDNN is held to {isa} (ONEDNN_MAX_CPU_ISA)"
    return True, f"the CPU reports {', '.join(units)}"


def resolve(numerics: str | None, device: torch.device | str) -> tuple[str, str]:
    """"auto" (or None: $MINIVAR_NUMERICS, else "auto") -> ("bf16" | "fp32" | "reference", the reason)."""
    name = "numerics"
    if numerics is None:
        name, numerics = "the environment variable MINIVAR_NUMERICS", os.environ.get("MINIVAR_NUMERICS") or "auto"
    if not isinstance(numerics, str) or numerics not in NUMERICS:
        raise ValueError(f"{name}={numerics!r} is invalid: use one of {', '.join(map(repr, NUMERICS))}")
    if numerics != "auto":
        return numerics, "asked for"
    fast, why = bf16_is_fast(device)
    return ("bf16" if fast else "fp32"), why


def context(mode: str, device: torch.device | str, images: int | None = None) -> ExitStack:
    """What a generation of `images` images (None: a text encoding) runs under, a context manager:
    * "reference", for a generation: products image by image (`parity.image_batch`), so no result
      depends on the batch;
    * half-precision numerics on a CPU whose ATen kernels are held below AVX-512 (ATEN_CPU_CAPABILITY):
      attention on SDPA's math kernel, because the fused CPU kernel's bf16 path stops there on AMX CPUs
      ("pack_vnni2 is only supported when avx512 is supported"); its products still go to oneDNN."""
    stack = ExitStack()
    if mode == "reference" and images is not None:
        from .parity import image_batch

        stack.enter_context(image_batch(images))
    held = not torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    if torch.device(device).type == "cpu" and COMPUTE_DTYPE.get(mode) == torch.bfloat16 and held:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def prepare(mode: str, transformer, vae=None, text_encoder=None) -> None:
    """Put a pipeline's models, in place, in numerics `mode` ("bf16", "fp32" or "reference", as `resolve`
    returns it). `minivar.load` loads the VAE and T5 in the mode's dtype already; the benchmark's
    random models arrive in float32."""
    from . import parity  # the reference numerics live there

    if mode == "reference":
        parity.apply(transformer)
        return
    transformer.set_compute_dtype(COMPUTE_DTYPE[mode])
    if mode == "bf16":
        if transformer.storage_dtype == torch.float32:  # published checkpoints are bf16 already
            transformer.to(torch.bfloat16)
        for model in (vae, text_encoder):
            if model is not None:
                model.to(torch.bfloat16)
        if vae is not None:  # the decoder's convolutions are fastest on channels-last maps and weights
            vae.to(memory_format=torch.channels_last)
