"""The benchmark runs end to end and reports what it promises. No timing is asserted."""
import json
import statistics

import pytest

from minivar import bench
from minivar.config import InfinityConfig

TINY = InfinityConfig(depth=4, embed_dim=128, num_heads=2, mlp_ratio=4, text_channels=128, d_vae=32)


def test_quick_mode_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    bench.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("Machine:")
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert report["matmul_peak"]["median"] > 0 and len(report["matmul_peak"]["samples"]) == 2
    assert [(c["subject"], c["res"], c["prune_on"]) for c in report["cases"]] == [("tiny", 512, False), ("tiny", 512, True)]
    for c in report["cases"]:
        assert set(c["time"]) == {"total", "text", "transformer", "vae"}
        assert {"median", "min", "max", "spread", "n"} <= set(c["time"]["total"])
        assert len(c["scale_time"]) == len(c["scales_run"]) == len(c["layer_time"])
        assert all(len(row) == c["depth"] for row in c["layer_time"])
        assert c["flops"]["transformer_flops"] > 0 and c["flops"]["vae_flops"] > 0
        assert c["peak_bytes"]["transformer"]["median"] > 0 and c["kv_cache_bytes"] > 0
    off, on = report["cases"]
    assert on["flops"]["transformer_flops"] < off["flops"]["transformer_flops"]
    (ab,) = report["comparisons"]
    assert ab["what"] == "prune" and ab["flop_ratio_transformer"] > 1


def test_full_depth_estimate_reuses_measured_layers():
    """A depth-2 random model extrapolated to depth 4: unpruned, every layer of the real model has
    a measured twin (same scale, tokens, keys, rows), so the estimate is plain arithmetic on them."""
    subj = bench.random_subject("tiny-shape", "custom", TINY, depth=2, vae=None, text_tokens=4)
    cases = [bench.Case("tiny-shape", 256, p, False) for p in (False, True)]
    results = bench.run_cases(subj, cases, warmup=0, repeats=1)
    table = bench.layer_table(list(results.values()))
    off = results[cases[0]]
    est = bench.extrapolate(subj, cases[0], off, table)
    sample = off["samples"][0]
    outside = sample["transformer"] - sum(map(sum, sample["layers"]))
    layers = sum(4 * statistics.median(table[bench.layer_key(sc, 0)]) for sc in off["plan"].counts)
    assert est["layers_priced_by_flops"] == 0
    assert est["transformer"] == pytest.approx(outside + layers)
    arith = est["memory_arithmetic"]
    assert arith["weights_full"] > arith["weights_now"] and arith["kv_full"] == 2 * arith["kv_now"]
    assert est["peak_bytes"] >= max(arith["measured_peaks"].values())


def test_default_cfg_stop_is_the_first_scale_with_an_eighth_of_the_final_tokens():
    from minivar.config import scale_schedule

    assert scale_schedule(1024)[bench.default_cfg_stop(scale_schedule(1024))] == (24, 24)
