"""Parity mode (minivar/parity.py): importing minivar leaves the process alone; reference mode is explicit."""
import os
import subprocess
import sys

import torch

from minivar import parity


def run_python(code: str, env: dict) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_import_leaves_the_environment_unchanged():
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = ("import os; before = dict(os.environ); import minivar, minivar.toy.train, minivar.cli; "
            "import torch; torch.ones(3).exp(); print(dict(os.environ) == before, 'ATEN_CPU_CAPABILITY' in os.environ)")
    assert run_python(code, env).split() == ["True", "False"]


def test_reference_mode_picks_avx2_kernels_when_called_first():
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = ("from minivar import parity; parity.reference_mode(); import torch; torch.ones(3).exp(); "
            "import os; print(os.environ['ATEN_CPU_CAPABILITY'], torch.backends.cpu.get_cpu_capability())")
    setting, chosen = run_python(code, env).split()
    assert setting == "avx2" and not chosen.startswith("AVX512")


def test_the_test_session_runs_in_reference_mode():
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def test_per_image_makes_small_products_independent_of_batch_mates():
    """Rows of image 0 computed beside other images equal image 0 computed alone. Alone, an image's
    input is its own contiguous tensor (as in a single-image generation), so that is the reference:
    a strided view of the same rows may take another BLAS kernel, and does on some CPUs."""
    torch.manual_seed(0)
    for rows in (1, 2, 40, 300):                        # per image: cond and uncond rows of each token
        w, x = torch.randn(64, 96), torch.randn(3 * rows, 5, 96)
        with parity.image_batch(3):
            together = parity.linear(x, w, None)
        for b in range(3):
            alone = torch.nn.functional.linear(x[b::3].contiguous(), w)
            assert torch.equal(together[b::3], alone), (rows, b)


def test_every_batched_product_of_a_generation_sees_contiguous_rows(monkeypatch):
    """parity.linear's guarantee rests on the model handing its products contiguous inputs (a single-image
    run computes on those as they are): check every call of a two-image generation."""
    from helpers import PROMPT, SETTINGS, tiny_pipeline

    seen, real = [], parity.linear

    def spy(x, weight, bias=None):
        seen.append(x.is_contiguous())
        return real(x, weight, bias)

    monkeypatch.setattr(parity, "linear", spy)
    tiny_pipeline().generate([PROMPT, "a blue cube"], res=1024, prune=True, output_type="latent", **SETTINGS)
    assert len(seen) > 100 and all(seen), f"{seen.count(False)} of {len(seen)} inputs were strided"


def test_text_attention_rounds_through_bf16_and_returns_fp32():
    torch.manual_seed(0)
    q, kv = torch.randn(2, 3, 2, 8), [torch.randn(5, 2, 2, 8).to(parity.TEXT_ATTENTION_DTYPE)]
    out = parity.text_attention(q, kv, [(0, 0, 5), (0, 2, 4)], 8**-0.5)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 8)
    assert torch.equal(out, out.bfloat16().float())     # the output went through bf16
    k, v = kv[0][2:4].float().unbind(1)
    ref = torch.softmax(torch.einsum("lhd,nhd->hln", q[1].bfloat16().float(), k) * 8**-0.5, -1) @ v.transpose(0, 1)
    assert torch.allclose(out[1], ref.transpose(0, 1), atol=1e-2)  # row 1 sees only its own segment
