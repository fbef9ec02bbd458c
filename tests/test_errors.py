"""Bad input gets one clear, actionable line; nothing is a raw traceback from inside torch."""
import shutil
import warnings

import pytest
import torch
from helpers import TINY, tiny_pipeline

import minivar
from minivar.loading.checkpoint import load_infinity
from minivar.model.config import InfinityConfig
from minivar.loading.weights import CheckpointError


def load_with(**overrides):
    files = dict(transformer=TINY / "infinity.pth", vae=TINY / "vae.pth", text_encoder=TINY / "t5",
                 config=TINY / "infinity_config.json", vae_config=TINY / "vae_config.json")
    return minivar.load(**{**files, **overrides})


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 800, msg
    return msg


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_with(transformer=tmp_path / "nope.pth")
    assert "not found" in one_line(err) and "nope.pth" in str(err.value)


def test_truncated_checkpoint(tmp_path):
    bad = tmp_path / "infinity.pth"
    data = (TINY / "infinity.pth").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_with(transformer=bad)
    assert "truncated or not a PyTorch checkpoint" in one_line(err)


def test_garbage_checkpoint(tmp_path):
    bad = tmp_path / "infinity.pth"
    bad.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError) as err:
        load_with(transformer=bad)
    one_line(err)


def test_checkpoint_of_another_model_names_the_mismatch():
    wider = InfinityConfig(depth=4, embed_dim=256, num_heads=2, text_channels=128)
    with pytest.raises(CheckpointError) as err:
        load_infinity(TINY / "infinity.pth", wider)
    msg = one_line(err)
    assert "shape mismatch" in msg and "(128" in msg and "another model" in msg


def test_vae_checkpoint_given_as_transformer():
    with pytest.raises(CheckpointError) as err:
        load_infinity(TINY / "vae.pth", InfinityConfig.from_upstream(TINY / "infinity_config.json"))
    assert "holds no tensors at its top level (its keys: vae)" in one_line(err)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(CheckpointError):
        load_with(transformer=bad)


@pytest.mark.parametrize("res", [300, 4096, "2M", "1x"])
def test_unknown_resolution_names_the_supported_ones(res):
    with pytest.raises(ValueError) as err:
        tiny_pipeline().generate("a cat", res=res)
    assert "256" in one_line(err) and "1024" in str(err.value)


@pytest.mark.parametrize("h_div_w", [0, -1.0, 10.0, float("nan"), "wide"])
def test_unknown_aspect_names_the_templates(h_div_w):
    with pytest.raises(ValueError) as err:
        tiny_pipeline().generate("a cat", res=256, h_div_w=h_div_w)
    assert "templates" in one_line(err)


def test_empty_prompt_is_refused_though_the_tokenizer_takes_it_like_upstream():
    pipe = tiny_pipeline()
    ids, mask = pipe.tokenizer([""])
    assert mask.sum() == 1 and ids[0, 0] == pipe.tokenizer.eos_id  # only EOS, as upstream's tokenizer
    for prompt in ("", "  ", ["a cat", "\n"]):
        with pytest.raises(ValueError, match="empty") as err:
            pipe.generate(prompt, res=256, seed=0)
        assert "\n" not in str(err.value)


def test_long_prompt_is_truncated_with_a_warning():
    with pytest.warns(UserWarning, match="truncated"):
        out = tiny_pipeline().generate("a cat " * 600, res=256, seed=0)
    assert out.image.size == (256, 256)


def test_absurdly_long_prompt_is_refused():
    with pytest.raises(ValueError) as err:
        tiny_pipeline().generate("x" * 100_000, res=256)
    assert "too long" in one_line(err)


def test_bad_prompt_type():
    with pytest.raises(ValueError):
        tiny_pipeline().generate(None, res=256)
    with pytest.raises(ValueError):
        tiny_pipeline().generate([], res=256)


def test_bad_cfg_insertion_layer():
    with pytest.raises(ValueError) as err:
        tiny_pipeline().generate("a cat", res=256, cfg_insertion_layer=5)
    assert "cfg_insertion_layer" in one_line(err)


def test_force_bits_of_the_wrong_shape():
    with pytest.raises(ValueError) as err:
        tiny_pipeline().generate("a cat", res=256, force_bits=[torch.zeros(1, 2, 2, 32, dtype=torch.long)])
    assert "force_bits[0]" in one_line(err)


def test_wrong_vae_config_for_checkpoint(tmp_path):
    shutil.copy(TINY / "vae.pth", tmp_path / "vae.pth")
    with pytest.raises(CheckpointError) as err:
        load_with(vae=tmp_path / "vae.pth", vae_config="d32")
    one_line(err)


def test_no_warnings_for_an_ordinary_prompt():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_pipeline().generate("a cat", res=256, seed=0)


def test_res_none_means_the_models_own_budget():
    pipe = tiny_pipeline()
    assert pipe.transformer.cfg.pn == "1M"   # an Infinity config: trained at 1024 x 1024
    assert pipe.schedule(None, 1.0) == pipe.schedule(1024, 1.0)
    assert pipe.schedule(None, 1.0) != pipe.schedule(256, 1.0)
