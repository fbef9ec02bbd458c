"""bf16 is a storage format on CPU: weights shrink, the math stays float32."""
from pathlib import Path

import pytest
import torch
from helpers import PROMPT, SETTINGS, TINY, tiny_pipeline

import minivar
from minivar import pipeline


def test_bf16_storage_on_cpu_generates_nearly_the_same_bits():
    pipe = minivar.load(transformer=TINY / "infinity.pth", vae=TINY / "vae.pth", text_encoder=TINY / "t5",
                        config=TINY / "infinity_config.json", vae_config=TINY / "vae_config.json",
                        dtype=torch.bfloat16)
    assert pipe.transformer.blocks[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    assert pipe.vae.decoder.conv_in.conv.weight.dtype == torch.float32  # small parts stay float32 on CPU
    out = pipe.generate(PROMPT, res=256, trace=True, output_type="latent", **SETTINGS)
    ref = tiny_pipeline().generate(PROMPT, res=256, trace=True, output_type="latent", **SETTINGS)
    assert out.trace.logits[0].dtype == torch.float32
    for a, b in zip(out.trace.bits, ref.trace.bits):
        assert (a != b).float().mean() < 0.02  # weight rounding flips a few near-even bits


# ---- the default keeps the stored dtype, memory-mapped -------------------------------------------
def bf16_model_dir(tmp_path):
    """The tiny-a model directory with its transformer stored in bfloat16, as Infinity publishes it."""
    import shutil

    sd = torch.load(TINY / "infinity.pth", weights_only=True)
    torch.save({k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "infinity.pth")
    for name in ("infinity_config.json", "vae.pth", "vae_config.json"):
        shutil.copy(TINY / name, tmp_path / name)
    shutil.copytree(TINY / "t5", tmp_path / "t5")
    return tmp_path


def test_default_load_keeps_the_stored_dtype_mapped_without_a_copy(tmp_path):
    model_dir = bf16_model_dir(tmp_path)
    pipe = minivar.load(model_dir)
    weights = list(pipe.transformer.parameters())
    assert {w.dtype for w in weights} == {torch.bfloat16}
    maps = pipeline.mappings()
    assert {Path(pipeline.mapping_of(w, maps).path) for w in weights} == {(model_dir / "infinity.pth").resolve()}
    t5_file = pipeline.mapping_of(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight, maps)
    assert Path(t5_file.path) == (model_dir / "t5" / "model.safetensors").resolve()
    assert Path(pipeline.mapping_of(pipe.vae.decoder.conv_in.conv.weight, maps).path) == (model_dir / "vae.pth").resolve()


def test_float32_on_request_copies_out_of_the_file(tmp_path):
    pipe = minivar.load(bf16_model_dir(tmp_path), dtype=torch.float32)
    w = pipe.transformer.blocks[0].sa.mat_qkv.weight
    assert w.dtype == torch.float32 and pipeline.mapping_of(w) is None  # a copy, in anonymous memory


def test_bf16_stored_linear_computes_in_float32_on_cpu(tmp_path):
    pipe = minivar.load(bf16_model_dir(tmp_path))
    lin = pipe.transformer.blocks[0].sa.mat_qkv
    x = torch.randn(3, 5, lin.in_features, generator=torch.Generator().manual_seed(0))
    out = lin(x)
    assert out.dtype == torch.float32
    ref = torch.nn.functional.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float())
    assert torch.equal(out, ref)  # the fp32 product of the bf16 values, not a bf16 product
    bf16_math = torch.nn.functional.linear(x.bfloat16(), lin.weight, None if lin.bias is None else lin.bias)
    assert not torch.equal(out, bf16_math.float())


def test_released_pages_leave_the_process_and_read_back_unchanged():
    pipe = minivar.load(transformer=TINY / "infinity.pth", vae=TINY / "vae.pth", text_encoder=TINY / "t5",
                        config=TINY / "infinity_config.json", vae_config=TINY / "vae_config.json")
    before = [p.clone() for p in pipe.transformer.parameters()]
    head = pipe.transformer.head.weight
    assert pipeline.mapping_of(head).stats["Rss"] > 0  # cloning read every page
    assert pipeline.release_mapped(pipe.transformer) > 0
    assert pipeline.mapping_of(head).stats["Rss"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.transformer.parameters()))


def test_weights_of_a_file_written_moments_ago_are_released_too(tmp_path):
    """A model used right after it was downloaded (or written) has pages the kernel has not yet written
    back: smaps counts them Private_Dirty, though the process never wrote them. They are released like
    clean pages, and read back the file's values."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "fresh.safetensors"
    save_file({"w": torch.randn(8, 1024, 256, generator=torch.Generator().manual_seed(0))}, path)
    with safe_open(str(path), framework="pt") as f:
        w = f.get_tensor("w")
    expected = w.clone()  # reads every page
    if pipeline.mapping_of(w).stats.get("Private_Dirty", 0) == 0:
        pytest.skip("the kernel already wrote the file back; nothing dirty to test")
    module = torch.nn.Module()
    module.register_buffer("w", w)
    assert pipeline.release_mapped(module) >= w.nbytes and pipeline.mapping_of(w).stats["Rss"] == 0
    assert torch.equal(w, expected)


def test_a_weight_changed_in_place_is_not_released():
    pipe = minivar.load(transformer=TINY / "infinity.pth", vae=TINY / "vae.pth", text_encoder=TINY / "t5",
                        config=TINY / "infinity_config.json", vae_config=TINY / "vae_config.json")
    w = pipe.transformer.head.weight
    with torch.no_grad():
        w[0, 0] += 1.0  # copy-on-write: this page is now the process's own
    changed = float(w[0, 0])
    pipeline.release_mapped(pipe.transformer)
    assert float(w[0, 0]) == changed


def test_kv_cache_is_stored_in_the_weights_dtype(tmp_path):
    from minivar.model.config import scale_schedule
    from minivar.model.pruning import PruneSchedule
    from minivar.model.sampling import Settings, make_caches, plan

    scales = scale_schedule(256)
    for pipe, dtype in ((minivar.load(bf16_model_dir(tmp_path)), torch.bfloat16), (tiny_pipeline(), torch.float32)):
        cfg = pipe.transformer.cfg
        the_plan = plan(cfg, scales, 1.0, Settings(), PruneSchedule.none())
        caches = make_caches(pipe.transformer, 2, the_plan, "cpu")
        assert {c.k.dtype for c in caches} == {c.v.dtype for c in caches} == {dtype}
        assert sum(c.nbytes for c in caches) == pipeline.kv_cache_bytes(the_plan, cfg, 2, dtype.itemsize)


def test_bf16_storage_computes_exactly_what_its_float32_copy_computes(tmp_path, monkeypatch):
    """Storage only: with the KV cache in float32 too, the bf16-stored model samples the bits of the same
    weights copied to float32 (a parameter used in bf16 arithmetic, e.g. the attention's learned scale
    exponentiated in bf16, breaks this)."""
    from minivar.model import transformer

    model_dir = bf16_model_dir(tmp_path)
    copied = minivar.load(model_dir, dtype=torch.float32).generate(PROMPT, res=256, trace=True, output_type="latent",
                                                                   **SETTINGS)
    monkeypatch.setattr(transformer.Infinity, "kv_dtype", property(lambda self: torch.float32))
    stored = minivar.load(model_dir).generate(PROMPT, res=256, trace=True, output_type="latent", **SETTINGS)
    assert all(torch.equal(a, b) for a, b in zip(stored.trace.bits, copied.trace.bits))


def test_bf16_numerics_hand_attention_bf16_so_flash_kernels_can_run(monkeypatch):
    """numerics="bf16" (what "auto" picks on CUDA and on CPUs with bf16 units): SDPA's flash kernels take
    only half-precision q, k and v. Checked on the CPU: what reaches every attention call of a generation
    (self-attention and the plain model's cross-attention), with bf16-stored weights."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from minivar.model import transformer

    pipe = minivar.load(transformer=TINY / "infinity.pth", vae=TINY / "vae.pth", text_encoder=TINY / "t5",
                        config=TINY / "infinity_config.json", vae_config=TINY / "vae_config.json",
                        dtype=torch.bfloat16, numerics="bf16")
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(transformer, "F", SimpleNamespace(**{**vars(F), "scaled_dot_product_attention": spy}))
    pipe.generate(PROMPT, res=256, output_type="latent", **SETTINGS)
    assert len(seen) > 2 * pipe.transformer.cfg.depth and set(seen) == {(torch.bfloat16,) * 3}
