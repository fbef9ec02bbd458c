"""The tokenizer and the T5 encoder against the golden fixture tiny-a, and the layouts of a T5 model directory."""
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file

from minivar.loading.checkpoint import load_t5
from minivar.numerics import attention_kernels
from minivar.model.t5 import T5_PRESETS, T5Config, T5Encoder
from minivar.model.t5 import Tokenizer
from minivar.loading.weights import CheckpointError

N_PROMPTS = 6
LONG_PROMPT = 5


@pytest.fixture(scope="module")
def fixtures(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(tiny_dir / "text_fixtures.pt", weights_only=True)


@pytest.fixture(scope="module")
def prompts(tiny_dir: Path) -> list[str]:
    return [p["text"] for p in json.loads((tiny_dir / "text_report.json").read_text())["prompts"]]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir / "t5")


@pytest.fixture(scope="module")
def t5(tiny_dir: Path) -> T5Encoder:
    return load_t5(tiny_dir / "t5")


def encode(model: T5Encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The kernels a generation would allow: the suite holds ATen to AVX2, where the fused CPU attention
    # kernel's bf16 path stops on AMX CPUs (numerics.attention_kernels).
    with torch.no_grad(), attention_kernels("cpu", next(model.parameters()).dtype):
        return model(ids, mask)


def assert_same_weights(a: T5Encoder, b: T5Encoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("i", range(N_PROMPTS))
def test_tokenizer_matches_fixture(tokenizer, prompts, fixtures, i):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the long prompt may warn
        if i == LONG_PROMPT:
            with pytest.warns(UserWarning, match="truncated") as record:
                ids, mask = tokenizer(prompts[i])
            assert len(record) == 1 and "dropped" in str(record[0].message)
        else:
            ids, mask = tokenizer(prompts[i])
    assert ids.dtype == mask.dtype == torch.long
    assert torch.equal(ids, fixtures[f"p{i}_input_ids"])
    assert torch.equal(mask, fixtures[f"p{i}_attention_mask"])
    assert torch.equal(ids[0, :int(mask.sum())], fixtures[f"p{i}_sentencepiece_ids"])


def test_tokenizer_batch_and_properties(tokenizer, prompts, fixtures):
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (420, 1, 0)
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tokenizer(prompts)
    assert torch.equal(ids, torch.cat([fixtures[f"p{i}_input_ids"] for i in range(N_PROMPTS)]))
    assert torch.equal(mask, torch.cat([fixtures[f"p{i}_attention_mask"] for i in range(N_PROMPTS)]))


def test_tokenizer_short_max_length(tokenizer):
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tokenizer("a red apple on a wooden table", max_length=4)
    assert ids.tolist() == [[3, 150, 68, 1]] and mask.tolist() == [[1, 1, 1, 1]]


@pytest.mark.parametrize("text, expected", [
    # recorded from transformers' T5Tokenizer(legacy=True) on this spiece.model
    ("a <extra_id_0> b", [3, 419, 57, 1]),
    ("a</s>b", [3, 1, 57, 1]),
    ("<pad> x", [0, 4, 37, 1]),
    ("<extra_id_99>", [320, 1]),
    ("<extra_id_100>", [4, 309, 18, 37, 6, 22, 35, 256, 319, 68, 256, 226, 214, 214, 292, 1]),
    ("ab<extra_id_0>", [3, 62, 419, 1]),
])
def test_tokenizer_special_tokens(tokenizer, text, expected):
    ids, mask = tokenizer(text, max_length=32)
    assert ids[0, :len(expected)].tolist() == expected
    assert int(mask.sum()) == len(expected)


def test_tokenizer_missing_files(tmp_path):
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_dir(tmp_path / "nowhere")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="spiece.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="sentencepiece"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------- T5 encoder

@pytest.mark.parametrize("layout", ["t5", "t5-sharded"])
def test_t5_matches_fixture(tiny_dir, fixtures, layout):
    model = load_t5(tiny_dir / layout)
    ids = torch.cat([fixtures[f"p{i}_input_ids"] for i in range(N_PROMPTS)])
    mask = torch.cat([fixtures[f"p{i}_attention_mask"] for i in range(N_PROMPTS)])
    for single in (False, True):  # the whole batch at once, and each prompt alone as upstream ran them
        hidden = (torch.cat([encode(model, ids[i:i + 1], mask[i:i + 1]) for i in range(N_PROMPTS)]) if single
                  else encode(model, ids, mask))
        assert hidden.shape == (N_PROMPTS, 512, 128) and hidden.dtype == torch.float32
        for i in range(N_PROMPTS):
            real = mask[i].bool()
            assert rel_err(hidden[i, real], fixtures[f"p{i}_last_hidden_state"][0, real]) <= 1e-5, (layout, i)


def test_t5_real_rows_ignore_padding(t5, tokenizer):
    """Padding only adds masked keys: the real rows must not depend on how much there is."""
    short = encode(t5, *tokenizer("a red apple on a wooden table", max_length=16))
    long = encode(t5, *tokenizer("a red apple on a wooden table", max_length=512))
    assert rel_err(short[:, :12], long[:, :12]) <= 1e-6


def test_t5_config_and_param_count(tiny_dir, t5):
    cfg = T5Config.from_json(tiny_dir / "t5" / "config.json")
    assert cfg == T5Config(vocab_size=420, d_model=128, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")
    assert sum(p.numel() for p in t5.parameters()) == 218_368  # MANIFEST section 1
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    assert not t5.training


def test_flan_t5_xl_keys_on_meta(tiny_dir):
    manifest = json.loads((tiny_dir.parent / "flan_t5_xl_encoder_keys.json").read_text())
    with torch.device("meta"):
        model = T5Encoder(T5_PRESETS["flan-t5-xl"])
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert list(ours) == list(manifest["keys"])
    assert ours == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]
    cfg = manifest["config"]
    assert T5_PRESETS["flan-t5-xl"] == T5Config(**{k: cfg[k] for k in T5Config.__dataclass_fields__})


def test_relu_feed_forward_builds_and_runs():
    cfg = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, feed_forward_proj="relu")
    model = T5Encoder(cfg)
    assert "encoder.block.1.layer.1.DenseReluDense.wi.weight" in model.state_dict()
    out = model(torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    assert out.shape == (2, 7, 16) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- checkpoint layouts

def copy_meta(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for name in ("config.json", "spiece.model"):
        shutil.copy(src / name, dst / name)
    return dst


def test_pytorch_bin_single_and_sharded(tiny_dir, t5, tmp_path):
    tensors = load_file(tiny_dir / "t5" / "model.safetensors")
    # a full encoder-decoder checkpoint also holds these; they must be ignored
    extra = {"decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(64, 128),
             "lm_head.weight": torch.zeros(420, 128)}
    single = copy_meta(tiny_dir / "t5", tmp_path / "single")
    torch.save(tensors | extra, single / "pytorch_model.bin")
    assert_same_weights(load_t5(single), t5)

    sharded = copy_meta(tiny_dir / "t5", tmp_path / "sharded")
    names = sorted(tensors)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: tensors[k] for k in keys}, sharded / file)
        weight_map |= dict.fromkeys(keys, file)
    weight_map |= dict.fromkeys(extra, "pytorch_model-00003-of-00003.bin")  # never written: must not be opened
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_t5(sharded)
    assert_same_weights(model, t5)
    ids, mask = torch.tensor([[3, 150, 68, 1, 0]]), torch.tensor([[1, 1, 1, 1, 0]])
    assert torch.equal(encode(model, ids, mask), encode(t5, ids, mask))


def test_sharded_reads_only_encoder_shards(tiny_dir, t5, tmp_path):
    src = tiny_dir / "t5-sharded"
    dst = copy_meta(src, tmp_path / "lazy")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for file in set(index["weight_map"].values()):
        shutil.copy(src / file, dst / file)
    missing = "model-00005-of-00005.safetensors"
    assert not (dst / missing).exists()
    index["weight_map"] |= {"decoder.block.0.layer.0.SelfAttention.q.weight": missing,
                            "decoder.final_layer_norm.weight": missing, "lm_head.weight": missing}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_weights(load_t5(dst), t5)


@pytest.mark.parametrize("names", [("encoder.embed_tokens.weight",),
                                   ("shared.weight", "encoder.embed_tokens.weight")])
def test_tied_embedding_under_either_name(tiny_dir, t5, tmp_path, names):
    tensors = load_file(tiny_dir / "t5" / "model.safetensors")
    embedding = tensors.pop("shared.weight")
    save_file(tensors | {n: embedding.clone() for n in names}, tmp_path / "model.safetensors")
    copy_meta(tiny_dir / "t5", tmp_path)
    model = load_t5(tmp_path)
    assert_same_weights(model, t5)
    assert model.shared.weight is model.encoder.embed_tokens.weight


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(tiny_dir, fixtures, dtype, tol):
    model = load_t5(tiny_dir / "t5", dtype=dtype)
    for name, p in model.named_parameters():
        # in float16 the FFN output projections stay float32 (flan-t5 overflows float16 there)
        keep_fp32 = dtype == torch.float16 and name.endswith("DenseReluDense.wo.weight")
        assert p.dtype == (torch.float32 if keep_fp32 else dtype), name
    hidden = encode(model, fixtures["p0_input_ids"], fixtures["p0_attention_mask"])
    assert hidden.dtype == dtype
    assert rel_err(hidden[0, :12], fixtures["p0_last_hidden_state"][0, :12]) <= tol


# ---------------------------------------------------------------------------------------------- bad input

def one_line_error(fn, *args, match: str = "") -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_directory_and_files(tiny_dir, tmp_path):
    one_line_error(load_t5, tmp_path / "nowhere", match="not found")
    one_line_error(load_t5, tmp_path, match="config.json")
    copy_meta(tiny_dir / "t5", tmp_path)
    one_line_error(load_t5, tmp_path, match="no model")
    (tmp_path / "config.json").write_text(json.dumps({"feed_forward_proj": "gated-silu"}))
    one_line_error(load_t5, tmp_path, match="gated-silu")


def test_truncated_safetensors(tiny_dir, tmp_path):
    data = (tiny_dir / "t5" / "model.safetensors").read_bytes()
    copy_meta(tiny_dir / "t5", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    one_line_error(load_t5, tmp_path, match="truncated")


def test_wrong_config_for_weights(tiny_dir, tmp_path):
    copy_meta(tiny_dir / "t5", tmp_path)
    shutil.copy(tiny_dir / "t5" / "model.safetensors", tmp_path)
    cfg = json.loads((tiny_dir / "t5" / "config.json").read_text()) | {"num_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_line_error(load_t5, tmp_path, match="missing key")
