"""The numerics layer: importing minivar leaves the process alone; reference mode is explicit."""
import os
import subprocess
import sys

import torch

from minivar import numerics


def run_python(code: str, env: dict) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_import_leaves_the_environment_unchanged():
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = ("import os; before = dict(os.environ); import minivar, minivar.toy.train, minivar.__main__; "
            "import torch; torch.ones(3).exp(); print(dict(os.environ) == before, 'ATEN_CPU_CAPABILITY' in os.environ)")
    assert run_python(code, env).split() == ["True", "False"]


def test_reference_mode_picks_avx2_kernels_when_called_first():
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = ("from minivar import numerics; numerics.reference_mode(); import torch; torch.ones(3).exp(); "
            "import os; print(os.environ['ATEN_CPU_CAPABILITY'], torch.backends.cpu.get_cpu_capability())")
    setting, chosen = run_python(code, env).split()
    assert setting == "avx2" and not chosen.startswith("AVX512")


def test_the_test_session_runs_in_reference_mode():
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def test_per_image_makes_small_products_independent_of_batch_mates():
    """Rows of image 0 computed beside other images equal image 0 computed alone."""
    torch.manual_seed(0)
    for rows in (2, 40, 300):                           # per image: cond and uncond rows of each token
        w, x = torch.randn(64, 96), torch.randn(3 * rows, 5, 96)
        alone = torch.nn.functional.linear(x[0::3], w)
        with numerics.image_batch(3):
            together = numerics.linear(x, w, None)
        assert torch.equal(together[0::3], alone), rows


def test_text_attention_rounds_through_bf16_and_returns_fp32():
    torch.manual_seed(0)
    q, kv = torch.randn(2, 3, 2, 8), [numerics.text_kv(torch.randn(5, 2, 2, 8))]
    out = numerics.text_attention(q, kv, [(0, 0, 5), (0, 2, 4)], 8**-0.5)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 8)
    assert torch.equal(out, out.bfloat16().float())     # the output went through bf16
    k, v = kv[0][2:4].float().unbind(1)
    ref = torch.softmax(torch.einsum("lhd,nhd->hln", q[1].bfloat16().float(), k) * 8**-0.5, -1) @ v.transpose(0, 1)
    assert torch.allclose(out[1], ref.transpose(0, 1), atol=1e-2)  # row 1 sees only its own segment
