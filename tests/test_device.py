"""Device-agnostic generation, checked on the CPU: `minivar.load` and the whole `Pipeline.generate` run
with the models on a pretend accelerator (tests/pretend_device.py), where an op that mixes devices, a
generator on the wrong device or a float64 tensor on the device raises. Results must equal the CPU
run's up to rounding (ATen's composite ops take their non-CPU kernels there)."""
from functools import lru_cache

import numpy as np
import pytest
import torch

from minivar import pipeline
from minivar.model import vae as vae_module
from minivar.model.pruning import projection_matrix
from helpers import PROMPT, SETTINGS, TINY, load_tiny, rel_err
from pretend_device import PRETEND, DeviceMix, Float64OnDevice, OnDevice, on_cpu, pretend_device

pytestmark = pytest.mark.usefixtures("one_thread")

# Together the cases reach every part of the path: text (with a negative prompt: T5 twice), the scale
# loop unpruned and with prune=True, StageVAR's projection selector and CFG stop, the random selector
# (a CPU generator by design), guidance mixed inside the blocks, the whole-map and banded decoders, and
# each numerics mode: "bf16" (what CUDA gets by default), "fp32" and "reference" (parity.py's classes).
CASES = {
    "plain, whole-map decode, bf16": dict(res=256, numerics="bf16"),
    "plain, whole-map decode, reference": dict(res=256, numerics="reference"),
    "prune=True, banded decode, bf16": dict(res=512, prune=True, tiled=True, numerics="bf16"),
    "stagevar, negative prompt, banded, bf16": dict(res=512, prune="stagevar", tiled=True, negative_prompt="blurry",
                                                    numerics="bf16"),
    "random selector, CFG inside the blocks, two prompts, fp32": dict(
        res=256, cfg_insertion_layer=-1, prune={"drop": {5: 0.5}, "cache_scale": 4, "selector": "random"},
        prompts=[PROMPT, "a blue car"], numerics="fp32"),
}
# Float64 on the CPU, by the minivar function that makes it: StageVAR's random projection is drawn
# once per generation in float64 on the CPU, so that every device gets the same matrix; only its
# float32 copy moves to the device.
CPU_FLOAT64 = {"stagevar, negative prompt, banded, bf16": {"projection_matrix"}}
# The pretend device takes ATen's non-CPU kernels (pretend_device.py): SDPA's math kernel moves float32
# logits by up to 1.4e-4 (bf16 attention runs on the math kernel on both sides here: equal logits);
# GroupNorm on a contiguous copy moves a float32 image by a level at most, and a bf16 one by 1.8 levels
# on average (a bf16 decode is itself 2 levels from a float32 one on average, up to 49 at some pixels).


@lru_cache(maxsize=None)
def cpu_pipe(numerics: str):
    return load_tiny(numerics=numerics)


@lru_cache(maxsize=None)
def device_pipe(numerics: str):
    """A tiny-a pipeline loaded onto the pretend device (which `minivar.load` would refuse: it only knows real ones)."""
    with pretend_device(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "check_device", lambda device: None)
        return load_tiny(device=PRETEND, numerics=numerics)


def generate(pipe, case: dict, monkeypatch, **extra):
    kw = {**SETTINGS, **case, **extra}
    prompts, tiled, _ = kw.pop("prompts", PROMPT), kw.pop("tiled", False), kw.pop("numerics")
    if tiled:  # bands of about 20 rows at full resolution: most maps are merged from several bands
        monkeypatch.setattr(vae_module, "TILE_ABOVE", 0)
        monkeypatch.setattr(vae_module, "BAND_ELEMS", 1 << 18)
    return pipe.generate(prompts, trace=True, **kw)


@pytest.mark.parametrize("case", CASES)
def test_generate_on_a_device_keeps_every_op_there_and_matches_the_cpu(case, monkeypatch):
    """Teacher-forced with the CPU run's bits, so that both runs see the same inputs at every scale."""
    mode = CASES[case]["numerics"]
    ref = generate(cpu_pipe(mode), CASES[case], monkeypatch)
    with pretend_device() as check:
        out = generate(device_pipe(mode), CASES[case], monkeypatch, force_bits=ref.trace.bits)
        assert isinstance(out.summed_codes, OnDevice)
        trace = on_cpu(out.trace)
    assert check.ops > 1000 and check.cpu_float64 == CPU_FLOAT64.get(case, set())
    for si, (a, b) in enumerate(zip(trace.logits, ref.trace.logits)):
        assert rel_err(a, b) < 1e-3, f"scale {si}"
    for a, b in zip(out.images, ref.images):
        levels = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert levels.mean() < 4 if mode == "bf16" else levels.max() <= 2


def test_encode_image_on_a_device():
    """Image -> bits (teacher forcing from a picture): resizing, the encoder and the quantiser."""
    image = TINY / "vae_roundtrip_input.png"
    with pretend_device() as check:
        bits = on_cpu(device_pipe("fp32").encode_image(image, res=256))
    assert all(torch.equal(a, b) for a, b in zip(bits, cpu_pipe("fp32").encode_image(image, res=256)))
    assert not check.cpu_float64


def test_banded_decode_keeps_its_statistics_on_the_device_in_float32(monkeypatch):
    """The banded decoder merged its GroupNorm statistics in a CPU float64 tensor: a device mix on any
    GPU, and a dtype that MPS does not have."""
    monkeypatch.setattr(vae_module, "BAND_ELEMS", 24 * 64 * 3)
    z = torch.randn(1, 32, 4, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cpu_pipe("fp32").vae.decode(z, tiled=True)
        with pretend_device() as check:
            out = device_pipe("fp32").vae.decode(z.to(PRETEND), tiled=True).cpu()
    assert not check.cpu_float64 and (out - ref).abs().max() <= 1e-5


def test_the_projection_is_drawn_on_the_cpu_whatever_the_default_device():
    """Every device gets the same StageVAR projection: under another default device it was drawn there
    (on meta: no values at all; on CUDA: from the CPU generator, which CUDA refuses)."""
    with torch.device("meta"):
        inside = projection_matrix(16, 4, seed=3)
    assert inside.device.type == "cpu" and torch.equal(inside, projection_matrix(16, 4, seed=3))


def test_phase_times_wait_for_the_device(monkeypatch):
    """A GPU op returns before it runs: `Output.timings` synchronises the device at every phase boundary."""
    waited = []
    monkeypatch.setattr(pipeline, "synchronize", waited.append)
    with pretend_device():
        device_pipe("fp32").generate(PROMPT, res=256, output_type="latent", **SETTINGS)
    assert waited == [PRETEND] * 4


def test_the_checker_catches_a_device_mix_a_cpu_generator_and_float64():
    with pretend_device():
        x = torch.ones(3, 2).to(PRETEND)
        with pytest.raises(DeviceMix, match="mixes devices"):
            x * torch.ones(3, 2)
        x * torch.tensor(2.0)  # a 0-dim CPU tensor is a scalar, as on CUDA
        with pytest.raises(DeviceMix, match="generator on cpu"):
            torch.multinomial(x, 1, generator=torch.Generator().manual_seed(0))
        torch.multinomial(x, 1, generator=torch.Generator(device=x.device).manual_seed(0))
        with pytest.raises(Float64OnDevice):
            x.double()
        assert isinstance(torch.tensor([1.0], device=x.device), OnDevice)
