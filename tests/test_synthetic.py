"""The synthetic checkpoint writers, on small listings (the full-size set is never written in tests)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minivar.bench import run as bench
from minivar.bench import synthetic
from minivar.loading.weights import read_state_dict
from minivar.model.t5 import T5_PRESETS, T5Config

ROOT = Path(__file__).resolve().parents[1]

LISTING = {"text_norm.weight": ([16], "float32"), "blocks.0.fc.weight": ([8, 16], "float32"),
           "blocks.0.fc.bias": ([8], "float32"), "quantizer.lfq.mask": ([4], "int64")}


def test_pth_has_the_listed_keys_shapes_and_dtypes_and_is_deterministic(tmp_path):
    synthetic.write_pth(tmp_path / "a.pth", LISTING, torch.bfloat16)
    synthetic.write_pth(tmp_path / "b.pth", LISTING, torch.bfloat16)
    a, b = read_state_dict(tmp_path / "a.pth"), read_state_dict(tmp_path / "b.pth")
    assert {k: (list(v.shape), v.dtype) for k, v in a.items()} == {
        "text_norm.weight": ([16], torch.bfloat16), "blocks.0.fc.weight": ([8, 16], torch.bfloat16),
        "blocks.0.fc.bias": ([8], torch.bfloat16), "quantizer.lfq.mask": ([4], torch.int64)}
    assert all(torch.equal(a[k], b[k]) for k in a)  # a fixed seed
    assert torch.equal(a["text_norm.weight"], torch.ones(16, dtype=torch.bfloat16))
    assert a["blocks.0.fc.bias"].abs().sum() == 0
    assert 0 < a["blocks.0.fc.weight"].float().std() < 0.1
    assert a["quantizer.lfq.mask"].tolist() == [8, 4, 2, 1]
    assert not list(tmp_path.glob(".*partial"))


def test_nested_pth_keeps_the_vae_wrapping(tmp_path):
    synthetic.write_pth(tmp_path / "vae.pth", LISTING, torch.float32, nest="vae")
    obj = torch.load(tmp_path / "vae.pth", weights_only=True)
    assert list(obj) == ["vae"] and obj["vae"]["blocks.0.fc.weight"].dtype == torch.float32


def test_safetensors_shards_and_index_cover_every_key_once(tmp_path):
    big = {"a.weight": ([32, 16], "float32"), "b.weight": ([32, 16], "float32")}
    synthetic.write_safetensors_shards(tmp_path, LISTING | big, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    seen = {}
    for name in shards:
        with safe_open(str(tmp_path / name), framework="pt") as f:
            seen |= {k: f.get_tensor(k) for k in f.keys()}
    assert set(seen) == set(index["weight_map"]) and len(seen) == 6
    assert index["weight_map"]["b.weight"] == shards[1]
    assert seen["b.weight"].dtype == torch.float32 and list(seen["b.weight"].shape) == [32, 16]


def test_synthetic_subject_runs_alone():
    with pytest.raises(SystemExit, match="runs on its own"):
        bench.main(["--subjects", "tiny", bench.SYNTHETIC])


def test_bench_defaults_to_the_stored_dtype():
    args = bench.parse_args([])
    assert args.weight_dtype == "stored" and bench.WEIGHT_DTYPES["stored"] is None


def test_measure_reports_the_process_wide_peak_of_the_sample_call_and_its_phases():
    """The bench's number is the child's ru_maxrss for one `minivar.sample` call (here on the toy), and
    every phase's sampled resident set lies under it, split into anonymous and file-backed pages."""
    from minivar.bench.synthetic import SAMPLE_PHASES, measure, synthetic_markdown

    arm = measure(64, True, "a red circle", None, model="toy")
    assert arm["image_size"] == [64, 64] and set(SAMPLE_PHASES) <= set(arm["peaks"]) == set(arm["seconds"])
    assert arm["peak_phase"] in arm["peaks"]
    slack = 8 << 20  # the kernel's RSS counters are cached per thread: readings may differ by a few pages
    for phase, p in arm["peaks"].items():
        assert 0 < p["RssAnon"] + p["RssFile"] <= p["VmRSS"] + slack and p["VmRSS"] <= arm["ru_maxrss"] + slack, phase
    table = synthetic_markdown({"arms": [arm], "set_bytes": {"x": 1}, "prompt": "a red circle"})
    assert f"**{arm['ru_maxrss'] / 2**30:.2f}**" in table and "toy 64 prune=on" in table


WRITE_SET_STUBBED = """
import json, sys
from pathlib import Path
import minivar.bench.synthetic as s

assert Path(s.__file__).is_relative_to(sys.argv[1]), s.__file__  # the copy, not the checkout
home, written = Path(sys.argv[2]), {}
s.write_pth = lambda path, listing, dtype, nest=None: written.update({path.name: len(listing)})  # not 10 GB
s.write_safetensors_shards = lambda folder, listing, shards: written.update({"t5": len(listing)})
s.write_set(home)
print(json.dumps(written))
"""


def test_the_synthetic_set_is_made_from_the_package_alone(tmp_path):
    """`--subjects infinity-2b-synthetic` from an install: a copy of the package with no tests/ folder
    beside it, run from elsewhere. The writers are stubbed; everything they are handed is checked."""
    site, home, elsewhere = tmp_path / "site", tmp_path / "home", tmp_path / "elsewhere"
    shutil.copytree(ROOT / "minivar", site / "minivar", ignore=shutil.ignore_patterns("__pycache__", "*.pth"))
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", WRITE_SET_STUBBED, str(site), str(home)], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # the published files' key counts (tests/fixtures/*_keys.json); T5's files hold the tied embedding once
    assert json.loads(r.stdout.splitlines()[-1]) == {"infinity_2b_reg.pth": 694, "infinity_vae_d32reg.pth": 270,
                                                     "t5": 219}
    t5 = synthetic.parts(home)["t5"]
    assert T5Config.from_json(t5 / "config.json") == T5_PRESETS["flan-t5-xl"]
    assert (t5 / "spiece.model").read_bytes() == (ROOT / "minivar/toy/weights/t5/spiece.model").read_bytes()
    assert json.loads((home / "SYNTHETIC.json").read_text())["seed"] == synthetic.SEED


def test_the_synthetic_listings_are_the_published_files_keys():
    fixtures = ROOT / "tests" / "fixtures"
    listings = synthetic.published_keys()
    for part, name in [("transformer", "infinity_2b_keys"), ("vae", "vae_d32_keys"), ("t5", "flan_t5_xl_encoder_keys")]:
        published = json.loads((fixtures / f"{name}.json").read_text())["keys"]
        assert listings[part] == {k: (shape, dtype) for k, (shape, dtype) in published.items()}, part
