"""Checkpoint forms the transformer loader accepts: upstream .pth, flat keys, sharded safetensors."""
import json

import pytest
import torch
from helpers import TINY
from safetensors.torch import save_file

from minivar.loading.checkpoint import flatten_block_keys, load_infinity
from minivar.model.config import InfinityConfig
from minivar.loading.weights import CheckpointError

CFG = InfinityConfig.from_upstream(TINY / "infinity_config.json")


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_safetensors_with_index_like_infinity_8b(tmp_path):
    sd = torch.load(TINY / "infinity.pth", weights_only=True)
    keys = list(sd)
    shards = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: sd[k].contiguous() for k in names}, tmp_path / fname)
        weight_map.update(dict.fromkeys(names, fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    base = load_infinity(TINY / "infinity.pth", CFG)
    assert same_weights(base, load_infinity(tmp_path / "model.safetensors.index.json", CFG))
    assert same_weights(base, load_infinity(tmp_path, CFG))  # the directory works too


def test_flat_block_keys_and_wrapper_prefixes(tmp_path):
    sd = torch.load(TINY / "infinity.pth", weights_only=True)
    flat = {f"module.{k}": v for k, v in flatten_block_keys(sd).items()}
    torch.save(flat, tmp_path / "flat.pth")
    assert same_weights(load_infinity(TINY / "infinity.pth", CFG), load_infinity(tmp_path / "flat.pth", CFG))


def mapped_ranges(path) -> list[tuple[int, int]]:
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_weights_are_memory_mapped_not_copied():
    path = (TINY / "infinity.pth").resolve()
    model = load_infinity(path, CFG)
    # a float32 file loaded into a float32 model: parameters live in the mapped file, no second copy
    for p in (model.head.weight, model.blocks[3].ffn.fc1.weight, model.cfg_uncond):
        assert any(lo <= p.data_ptr() < hi for lo, hi in mapped_ranges(path))
    assert not model.head.weight.requires_grad and not model.training


def test_ddp_and_compile_prefixes_on_upstream_block_chunk_names(tmp_path):
    sd = torch.load(TINY / "infinity.pth", weights_only=True)  # upstream names: block_chunks.{c}.module.{i}
    base = load_infinity(TINY / "infinity.pth", CFG)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "wrapped.pth")
        assert same_weights(base, load_infinity(tmp_path / "wrapped.pth", CFG)), prefix


def test_errors_name_keys_as_the_file_does(tmp_path):
    sd = torch.load(TINY / "infinity.pth", weights_only=True)
    del sd["block_chunks.1.module.1.ffn.fc1.weight"]  # CFG: 2 chunks of 2 blocks, so this is block 3
    sd["block_chunks.0.module.1.ffn.fc2.bias"] = torch.zeros(7)
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_infinity(tmp_path / "bad.pth", CFG)
    msg = str(err.value)
    assert "module.block_chunks.1.module.1.ffn.fc1.weight (minivar: blocks.3.ffn.fc1.weight)" in msg
    assert "module.block_chunks.0.module.1.ffn.fc2.bias (minivar: blocks.1.ffn.fc2.bias) (7,)" in msg


def test_loading_a_model_does_not_import_the_benchmark():
    """The loaders took `param_count` from the FLOP counter, closing an import circle bench -> pipeline
    -> loading -> bench; it is `InfinityConfig.param_count` now."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import sys, minivar; minivar.load({str(TINY)!r}); "
            "print(sorted(m for m in sys.modules if m.startswith('minivar.bench')))")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
