"""The benchmark runs end to end and reports what it promises. No timing is asserted."""
import json
import statistics

import pytest
import torch

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


def test_bf16_weights_and_banded_decode_enter_the_memory_arithmetic():
    """--weight-dtype bf16 halves the weights in the real-depth estimate, and every phase's estimate
    is the sum of the parts the report lists."""
    import torch

    from minivar.flops import param_count
    from minivar.vae import VAEConfig

    vae = VAEConfig(codebook_dim=32, base_ch=24, num_res_blocks=1, ch_mult=(1, 2, 4, 4, 4), patch_size=16)
    subj = bench.random_subject("tiny-shape", "custom", TINY, depth=2, vae=vae, text_tokens=4,
                                weight_dtype=torch.bfloat16)
    subj.tiled_decode = True
    assert all(t.dtype == torch.bfloat16 for t in subj.model.state_dict().values() if t.is_floating_point())
    case = bench.Case("tiny-shape", 256, True, False)
    results = bench.run_cases(subj, [case], warmup=0, repeats=1)
    est = bench.extrapolate(subj, case, results[case], bench.layer_table(list(results.values())))
    arith, parts, phase = est["memory_arithmetic"], est["memory_arithmetic"]["parts"], est["peak_by_phase"]
    assert arith["weight_dtype"] == "torch.bfloat16" and arith["weights_full"] == 2 * param_count(TINY)
    assert arith["largest_weight_upcast"] == 4 * 6 * TINY.embed_dim**2  # shared_ada_lin: the largest matrix
    fixed = parts["weights"] + parts["other"]
    assert phase["transformer"] == fixed + parts["kv_cache"] + parts["restore_cache"] + parts["activations"]
    assert phase["vae"] == fixed + parts["decoder"] and est["peak_bytes"] == max(phase.values())
    assert "bfloat16" in "\n".join(bench.memory_lines([{"label": "x", "full_depth_estimate": est}]))


def test_cli_options_for_weights_and_decoding():
    args = bench.parse_args(["--quick", "--weight-dtype", "bf16", "--decode", "banded"])
    assert (args.weight_dtype, args.decode, args.subjects) == ("bf16", "banded", ["tiny"])
    assert bench.DECODE_MODES[args.decode] is True and bench.WEIGHT_DTYPES[args.weight_dtype] is torch.bfloat16
