"""The numerics policy (minivar/numerics.py): what "auto" picks, what each mode loads and computes in, and
how far the fast modes drift from the reference numerics.

The suite's default is "reference" (conftest.py); every test here names the mode it runs.
"""
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minivar
from minivar import numerics
from minivar.model import transformer
from helpers import PROMPT, SETTINGS, TINY, rel_err

# Teacher-forced logits (the reference run's bits forced on the fast run) on tiny-a at 1024, relative
# error per scale. Measured (AMD EPYC, AVX-512 + AVX512-BF16): fp32 2.7e-3 (the reference rounds the text
# attention through bf16, fp32 does not), bf16 1.3e-2 (one thread) to 1.5e-2 (two). The bounds leave room
# for other CPUs' kernels.
FP32_DRIFT, BF16_DRIFT = 6e-3, 3e-2


@lru_cache(maxsize=None)
def tiny(mode: str, dtype: torch.dtype | None = None) -> minivar.Pipeline:
    return minivar.load(transformer=TINY / "infinity.pth", vae=TINY / "vae.pth", text_encoder=TINY / "t5",
                        config=TINY / "infinity_config.json", vae_config=TINY / "vae_config.json",
                        numerics=mode, dtype=dtype)


# ---------------------------------------------------------------------------------------------- policy
@pytest.fixture
def cpu(monkeypatch):
    """A CPU with the given flags, ATen capability and oneDNN limit."""
    def make(flags=(), aten="AVX512", isa=None):
        monkeypatch.setattr(numerics, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    return make


@pytest.mark.parametrize("flags, aten, isa, want", [
    (("avx2", "avx512f", "amx_bf16", "avx512_bf16"), "AVX512", None, "bf16"),     # Intel with AMX
    (("avx2", "avx512f", "avx512_bf16"), "AVX512", None, "bf16"),                 # AMD Zen 4
    (("avx2", "avx512f"), "AVX512", None, "fp32"),                                # AVX-512 without bf16
    (("avx2",), "AVX2", None, "fp32"),                                            # AVX2 only
    (("avx512f", "amx_bf16"), "AVX2", None, "fp32"),                              # ATen held to AVX2
    (("avx512f", "amx_bf16"), "AVX512", "AVX2", "fp32"),                          # oneDNN held to AVX2
    (("avx512f", "amx_bf16"), "AVX512", "avx512_core_amx", "bf16"),
])
def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units_and_the_kernels_may_use_them(cpu, monkeypatch, flags,
                                                                                       aten, isa, want):
    cpu(flags, aten, isa)
    monkeypatch.delenv("MINIVAR_NUMERICS")
    mode, why = numerics.resolve(None, "cpu")
    assert mode == want, why
    assert numerics.resolve("auto", "cpu")[0] == want and why and "\n" not in why


def test_explicit_modes_and_the_environment_default(cpu, monkeypatch):
    cpu(("avx512_bf16",))
    for mode in ("bf16", "fp32", "reference"):
        assert numerics.resolve(mode, "cpu")[0] == mode
    monkeypatch.setenv("MINIVAR_NUMERICS", "fp32")
    assert numerics.resolve(None, "cpu")[0] == "fp32"
    assert numerics.resolve("auto", "cpu")[0] == "bf16"  # an explicit "auto" decides by the device
    assert numerics.resolve("auto", "mps")[0] == "fp32"
    assert numerics.resolve("auto", "meta")[0] == "fp32"


@pytest.mark.parametrize("bad", ["fast", "BF16", "", 16, torch.bfloat16, ["bf16"]])
def test_a_bad_numerics_value_is_one_line_before_anything_loads(bad, tmp_path):
    with pytest.raises(ValueError, match="numerics=.*auto.*bf16.*fp32.*reference") as e:
        minivar.load(tmp_path / "nothing-here", numerics=bad)
    assert "\n" not in str(e.value)


def test_a_bad_environment_default_names_the_variable(monkeypatch):
    monkeypatch.setenv("MINIVAR_NUMERICS", "fast")
    with pytest.raises(ValueError, match="MINIVAR_NUMERICS='fast' is invalid"):
        numerics.resolve(None, "cpu")


def test_the_context_keeps_bf16_attention_off_the_fused_cpu_kernel_when_aten_is_held_below_avx512(cpu):
    from minivar import parity

    flash = torch.backends.cuda.flash_sdp_enabled  # the backend switches SDPA reads on CPU too
    cpu(aten="AVX2")
    with numerics.context("bf16", "cpu"):
        assert not flash() and torch.backends.cuda.math_sdp_enabled()
    for mode in ("fp32", "reference"):
        with numerics.context(mode, "cpu"):
            assert flash()
    cpu(aten="AVX512")
    with numerics.context("bf16", "cpu"):
        assert flash()
    with numerics.context("reference", "cpu", images=3):  # the reference numerics compute image by image
        assert parity._IMAGES.get() == 3
    with numerics.context("bf16", "cpu", images=3):
        assert parity._IMAGES.get() == 1


# ---------------------------------------------------------------------------------------------- loading
def test_each_mode_loads_what_it_says():
    ref, fp32, bf16 = tiny("reference"), tiny("fp32"), tiny("bf16")
    assert (ref.numerics, fp32.numerics, bf16.numerics) == ("reference", "fp32", "bf16")
    assert type(ref.transformer).__name__ == "ParityInfinity"
    assert type(fp32.transformer) is type(bf16.transformer) is transformer.Infinity  # the plain model runs
    assert fp32.transformer.compute_dtype == torch.float32 and bf16.transformer.compute_dtype == torch.bfloat16
    assert bf16.transformer.storage_dtype == bf16.transformer.kv_dtype == torch.bfloat16  # tiny-a stores fp32
    for pipe, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        assert {p.dtype for p in pipe.vae.parameters()} == {p.dtype for p in pipe.text_encoder.parameters()} == {dtype}
    conv = bf16.vae.decoder.conv_in.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_fp32_runs_bf16_stored_weights_in_place():
    """The published checkpoints store bf16; fp32 numerics upcast per product and keep no float32 copy."""
    pipe = tiny("fp32", torch.bfloat16)
    model = pipe.transformer
    assert model.storage_dtype == torch.bfloat16 and model.compute_dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.blocks.parameters())
    out = pipe.generate(PROMPT, res=256, trace=True, **SETTINGS)
    assert all(torch.isfinite(t).all() for t in out.trace.logits) and out.numerics == "fp32"


# ---------------------------------------------------------------------------------------------- drift
@lru_cache(maxsize=None)
def reference_run(prune: bool):
    return tiny("reference").generate(PROMPT, res=1024, trace=True, prune=prune, **SETTINGS)


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("mode, bound", [("fp32", FP32_DRIFT), ("bf16", BF16_DRIFT)])
def test_fast_modes_stay_within_the_stated_drift_of_the_reference(mode, bound, prune):
    ref = reference_run(prune)
    out = tiny(mode).generate(PROMPT, res=1024, trace=True, prune=prune, force_bits=ref.trace.bits, **SETTINGS)
    assert out.trace.scales == ref.trace.scales
    errs = [rel_err(a, b) for a, b in zip(out.trace.logits, ref.trace.logits)]
    assert max(errs) <= bound, [f"{e:.1e}" for e in errs]
    assert min(errs) > 0  # the modes do differ: this is not the reference path under another name
    assert all(torch.equal(a, b) for a, b in zip(out.trace.bits, ref.trace.bits))  # forced
    diff = np.abs(np.asarray(out.image, dtype=int) - np.asarray(ref.image, dtype=int))
    assert diff.mean() <= (0.01 if mode == "fp32" else 4.0), diff.mean()  # fp32 decodes the same latent in fp32


def test_unpadded_text_encoding_agrees_with_the_padded_one():
    """Fast modes encode only up to the longest prompt; the real tokens' features match the 512-position
    encoding within rounding (float32) or bf16 rounding (bf16)."""
    prompts = [PROMPT, "a blue cube"]
    for mode, tol in (("fp32", 1e-5), ("bf16", 2e-2)):
        pipe = tiny(mode)
        feats, lens = pipe.encode_text(prompts)
        ids, mask = pipe.tokenizer(prompts)
        assert max(lens) < ids.shape[1] == 512
        with torch.no_grad(), numerics.context(mode, "cpu"):
            padded = pipe.text_encoder(ids, mask).float()
        for f, p, n in zip(feats, padded, lens):
            assert f.shape[0] == n and rel_err(f, p[:n]) <= tol, (mode, rel_err(f, p[:n]))


# ---------------------------------------------------------------------------------------------- plain model
def test_plain_cross_attention_masks_each_row_to_its_own_text():
    """Two rows with texts of 3 and 7 tokens: padded together, each row must equal attending to its own
    text alone. Without the padding mask, the short row's queries would see four zero keys and values."""
    torch.manual_seed(0)
    ca = transformer.CrossAttention(dim=16, kv_dim=12, heads=2)
    for p in ca.parameters():
        torch.nn.init.normal_(p, std=0.5)
    tokens = torch.randn(10, 12)
    text = transformer.Text([tokens], [(0, 0, 3), (0, 3, 10)])
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        both = ca(x, text)
        for r, (s, e) in enumerate(((0, 3), (3, 10))):
            alone = ca(x[r : r + 1], transformer.Text([tokens[s:e]], [(0, 0, e - s)]))
            torch.testing.assert_close(both[r : r + 1], alone, rtol=1e-5, atol=1e-6)
        # the check has teeth: attending to the padded keys unmasked changes the short row
        kv = ca.mat_kv(tokens, torch.cat((ca.zero_k_bias, ca.v_bias))).view(10, 2, 2, 8)
        k, v = F.pad(kv[:3], (0, 0, 0, 0, 0, 0, 0, 4)).permute(1, 2, 0, 3)  # (2, H, 7, hd) each
        q = ca.mat_q(x[:1]).view(1, 5, 2, 8).transpose(1, 2)
        unmasked = ca.proj(F.scaled_dot_product_attention(q, k[None], v[None]).transpose(1, 2).reshape(1, 5, 16))
        assert not torch.allclose(unmasked, both[:1], atol=1e-3)


def test_linear_computes_in_its_compute_dtype_whatever_the_weights_store():
    layer = transformer.Linear(8, 4).to(torch.bfloat16)
    x = torch.randn(3, 8)
    assert layer(x).dtype == torch.float32  # fp32 compute on bf16 storage: upcast per product
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight.float(), layer.bias.float()))
    layer.compute_dtype = torch.bfloat16
    assert layer(x).dtype == torch.bfloat16
    bias = torch.ones(4)
    torch.testing.assert_close(layer(x, bias).float(), F.linear(x.bfloat16(), layer.weight, bias.bfloat16()).float())


def test_sample_and_the_output_say_which_numerics_ran():
    image = minivar.sample("a red circle", model="toy", numerics="bf16", progress=False)
    assert image.info["numerics"] == "bf16"
    assert tiny("fp32").generate(PROMPT, res=256, output_type="latent", **SETTINGS).numerics == "fp32"
