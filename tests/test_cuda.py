"""On a CUDA machine: generation on the tiny fixture in numerics "bf16" (what `minivar.load` picks on CUDA)
against the CPU float32 reference.

Marked `cuda` and skipped without CUDA; `python -m minivar.bench.device_check` runs them (`pytest -m cuda`).
CPU CI checks the same code for device placement on a pretend accelerator (test_device.py).

Tolerance. bf16 keeps 8 significant bits (a relative rounding step of 2^-8 = 0.4 %), and "bf16" runs
T5, the products, attention and the VAE in it. The compared numbers are the bit logits after guidance
and temperature, teacher-forced with the reference's bits so that both runs see the same inputs at
every scale; the error is the relative Frobenius norm of the difference at each scale. The same
numerics computed on the CPU (test_device.py's pretend device, or numerics="bf16" on a CPU) put it at
0.9-1.3 % per scale on this fixture. LOGIT_TOL is 4x that; conditioning on another prompt moves the
logits by 43-107 %, and a real fault (rows of a batch mixed up, a mask or scale of attention wrong) by
tens of percent.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from helpers import PROMPT, SETTINGS, load_tiny, rel_err, tiny_pipeline

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LOGIT_TOL = 0.05
RUNS = {"256": dict(res=256), "512 prune=True": dict(res=512, prune=True),
        "512 stagevar": dict(res=512, prune="stagevar")}


@pytest.fixture(scope="module")
def bf16():
    return load_tiny(device="cuda", numerics="bf16")


def traced(pipe, prompts=PROMPT, **kw):
    return pipe.generate(prompts, trace=True, output_type="latent", **{**SETTINGS, **kw})


def logit_errors(a, b, row: int = 0) -> list[float]:
    """Per scale: relative error of run a's logits of batch row `row` against run b's (one image)."""
    return [rel_err(x[row], y[0]) for x, y in zip(a.trace.logits, b.trace.logits)]


def test_models_are_on_cuda_in_bf16(bf16):
    assert bf16.device.type == "cuda" and bf16.numerics == "bf16" and bf16.transformer.compute_dtype == torch.bfloat16
    assert all(p.is_cuda for m in (bf16.transformer, bf16.vae, bf16.text_encoder) for p in m.parameters())


def test_bf16_generation_runs_on_flash_or_memory_efficient_attention(bf16):
    """Every SDPA call of a generation (T5, text pooling, cross- and self-attention) finds a fused kernel:
    with only these two allowed, any call that would fall back to the math kernel raises."""
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        for kw in RUNS.values():
            out = bf16.generate(PROMPT, **{**SETTINGS, **kw})
            assert out.image.size == (kw["res"], kw["res"])


def test_cuda_generator_is_seeded_and_reproducible(bf16):
    a, b, c = (traced(bf16, res=256, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a.trace.bits, b.trace.bits))
    assert not all(torch.equal(x, y) for x, y in zip(a.trace.bits, c.trace.bits))


@pytest.mark.parametrize("run", RUNS)
def test_bf16_logits_agree_with_the_cpu_float32_reference(bf16, run):
    ref = traced(tiny_pipeline(), **RUNS[run])
    out = traced(bf16, force_bits=ref.trace.bits, **RUNS[run])
    errors = logit_errors(out, ref)
    assert max(errors) < LOGIT_TOL, [f"{e:.4f}" for e in errors]


def test_a_two_image_batch_equals_two_single_runs(bf16):
    prompts, kw = [PROMPT, "a blue car"], dict(res=512, prune=True)
    singles = [traced(bf16, p, **kw) for p in prompts]
    forced = [torch.cat([s.trace.bits[si] for s in singles]) for si in range(len(singles[0].trace.bits))]
    batch = traced(bf16, prompts, force_bits=forced, **kw)
    for row, single in enumerate(singles):
        errors = logit_errors(batch, single, row)
        assert max(errors) < LOGIT_TOL, [f"{e:.4f}" for e in errors]
