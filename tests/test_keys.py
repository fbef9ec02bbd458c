"""Real-size checkpoints: minivar's modules, built on the meta device, have exactly their keys and shapes."""
import json
from pathlib import Path

import pytest
import torch

from minivar.loading.checkpoint import flatten_block_keys
from minivar.model.config import PRESETS, InfinityConfig
from minivar.model.transformer import Infinity

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name,listing", [("infinity-2b", "infinity_2b_keys.json"),
                                          ("infinity-8b", "infinity_8b_keys.json")])
def test_transformer_keys_and_shapes_match_the_real_checkpoints(name, listing):
    manifest = json.loads((FIXTURES / listing).read_text())
    keys = manifest["keys"]
    want = dict(zip(flatten_block_keys(dict.fromkeys(keys)), (tuple(v[0]) for v in keys.values())))
    with torch.device("meta"):
        model = Infinity(PRESETS[name])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]  # buffers excluded


def test_flatten_block_keys_infers_the_chunk_size():
    sd = {f"block_chunks.{c}.module.{i}.ada_gss": c * 10 + i for c in range(2) for i in range(5)}
    sd["module.head.weight"] = -1
    flat = flatten_block_keys(sd)
    assert flat["blocks.7.ada_gss"] == 12 and flat["blocks.4.ada_gss"] == 4 and flat["head.weight"] == -1
    assert flatten_block_keys({"blocks.3.x": 1, "lvl_1L": 0}) == {"blocks.3.x": 1}  # flat form passes through


def test_config_from_upstream_constructor_arguments():
    cfg = InfinityConfig.from_upstream(FIXTURES / "tiny-a" / "infinity_config.json")
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.text_channels, cfg.d_vae) == (4, 128, 2, 128, 32)
    eight = InfinityConfig.from_upstream(json.loads((FIXTURES / "infinity_8b_keys.json").read_text())["constructor_kwargs"])
    assert eight.spatial_patchify and eight.d_vae == 56 and eight.embed_dim == 3584


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_on_the_real_upstream_names(prefix):
    """DDP writes `module.block_chunks.0.module.0.ada_gss`, torch.compile `_orig_mod.`: the chunk size must be
    inferred after the wrapper is stripped, so the 2B's 8 chunks of 4 blocks still give blocks 0..31."""
    keys = json.loads((FIXTURES / "infinity_2b_keys.json").read_text())["keys"]
    plain = flatten_block_keys({k: k for k in keys})
    wrapped = flatten_block_keys({prefix + k: k for k in keys})
    assert wrapped == plain
    assert wrapped["blocks.7.ffn.fc1.weight"] == "block_chunks.1.module.3.ffn.fc1.weight"
    assert sum(k.endswith(".ada_gss") for k in wrapped) == 32
