"""The benchmark runs end to end and reports what it promises. No timing is asserted."""
import dataclasses
import json
import statistics

import pytest
import torch

import minivar
from minivar.bench import run as bench
from minivar.model.config import InfinityConfig

TINY = InfinityConfig(depth=4, embed_dim=128, num_heads=2, mlp_ratio=4, text_channels=128, d_vae=32)


def test_quick_mode_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    bench.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("Machine:") and "`Pipeline.generate` call" in md and "separate, untimed" in md
    assert "% of conv peak" in md and report["keep_freed_memory"] is False
    assert (tmp_path / "bench.png").stat().st_size > 0
    for kind in ("matmul_peak", "conv_peak"):
        assert report[kind]["median"] > 0 and len(report[kind]["samples"]) == 2
    assert [(c["subject"], c["res"], c["prune_on"]) for c in report["cases"]] == [("tiny", 512, False), ("tiny", 512, True)]
    for c in report["cases"]:
        assert set(c["time"]) == {"total", "text", "transformer", "vae"}
        assert {"median", "min", "max", "spread", "n"} <= set(c["time"]["total"])
        assert len(c["scale_time"]) == len(c["scales_run"]) == len(c["layer_time"])
        assert all(len(row) == c["depth"] for row in c["layer_time"])
        assert c["flops"]["transformer_flops"] > 0 and c["flops"]["vae_flops"] > 0
        assert c["peak_bytes"]["transformer"]["median"] > 0 and c["kv_cache_bytes"] > 0
        assert c["pct_of_peak"]["vae"] > 0 and c["pct_of_peak"]["vae_vs_matmul"] > 0
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


def test_restoration_cache_is_the_plans():
    """The bench re-derived the restoration cache from the schedule with both halves of the rows; with its
    default CFG stop at 1024 (24x24, the cache scale) the cache holds one half."""
    from minivar.model.sampling import plan
    from minivar.pipeline import restore_cache_bytes

    subj = bench.random_subject("tiny-shape", "custom", TINY, depth=2, vae=None, text_tokens=4)
    for stop in (False, True):
        case_plan = bench.plan_case(subj, bench.Case("tiny-shape", 1024, True, stop))
        the_plan = plan(subj.model.cfg, case_plan.scales, 1.0, case_plan.settings, case_plan.prune)
        assert case_plan.restore_bytes == restore_cache_bytes(the_plan, subj.model.cfg, images=1) > 0
        assert the_plan.steps[the_plan.prune.cache_scale].guided is not stop


def test_default_cfg_stop_is_the_first_scale_with_an_eighth_of_the_final_tokens():
    from minivar.model.config import scale_schedule

    assert scale_schedule(1024)[bench.default_cfg_stop(scale_schedule(1024))] == (24, 24)


def test_bf16_weights_and_banded_decode_enter_the_memory_arithmetic():
    """--weight-dtype bf16 halves the weights in the real-depth estimate, and every phase's estimate
    is the sum of the parts the report lists."""
    import torch

    from minivar.model.vae import VAEConfig

    vae = VAEConfig(codebook_dim=32, base_ch=24, num_res_blocks=1, ch_mult=(1, 2, 4, 4, 4), patch_size=16)
    subj = bench.random_subject("tiny-shape", "custom", TINY, depth=2, vae=vae, text_tokens=4,
                                weight_dtype=torch.bfloat16)
    bench.pin_decode_mode(subj.pipe.vae, True)
    assert all(t.dtype == torch.bfloat16 for t in subj.model.state_dict().values() if t.is_floating_point())
    case = bench.Case("tiny-shape", 256, True, False)
    results = bench.run_cases(subj, [case], warmup=0, repeats=1)
    est = bench.extrapolate(subj, case, results[case], bench.layer_table(list(results.values())))
    arith, parts, phase = est["memory_arithmetic"], est["memory_arithmetic"]["parts"], est["peak_by_phase"]
    assert arith["weight_dtype"] == "torch.bfloat16" and arith["weights_full"] == 2 * TINY.param_count()
    assert arith["largest_weight_upcast"] == 4 * 6 * TINY.embed_dim**2  # shared_ada_lin: the largest matrix
    fixed = parts["weights"] + parts["other"]
    assert phase["transformer"] == fixed + parts["kv_cache"] + parts["restore_cache"] + parts["activations"]
    assert phase["vae"] == fixed + parts["decoder"] and est["peak_bytes"] == max(phase.values())
    assert "bfloat16" in "\n".join(bench.memory_lines([{"label": "x", "full_depth_estimate": est}]))


def test_cli_options_for_weights_and_decoding():
    args = bench.parse_args(["--quick", "--weight-dtype", "bf16", "--decode", "banded"])
    assert (args.weight_dtype, args.decode, args.subjects) == ("bf16", "banded", ["tiny"])
    assert bench.DECODE_MODES[args.decode] is True and bench.WEIGHT_DTYPES[args.weight_dtype] is torch.bfloat16


# --------------------------------------------------------------------------------------------------
# The bench times what Pipeline.generate runs: same calls, same order, same arguments
# --------------------------------------------------------------------------------------------------
def describe(x):
    """A comparable summary of an argument: tensors by shape, strides (memory layout) and dtype."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), str(x.dtype))
    if isinstance(x, (list, tuple)):
        return tuple(describe(v) for v in x)
    if dataclasses.is_dataclass(x):
        return (type(x).__name__, tuple(describe(getattr(x, f.name)) for f in dataclasses.fields(x)))
    if isinstance(x, dict):
        return tuple((k, describe(v)) for k, v in x.items())
    if isinstance(x, (torch.nn.Module, minivar.Pipeline)):
        return type(x).__name__
    if hasattr(x, "__dict__"):  # e.g. numerics.Text
        return (type(x).__name__, describe(vars(x)))
    return x


def record_calls(monkeypatch) -> list:
    """Wrap every function a generation goes through (and the bench's allocator switches); each call
    appends (name, described arguments). The scale loop's `progress` hook is left out: it is how the
    bench reads per-scale times."""
    import minivar.pipeline as pipeline_mod
    from minivar.model.transformer import Infinity
    from minivar.model.vae import BSQVAE, Decoder

    calls = []

    def wrap(owner, name):
        fn = getattr(owner, name)

        def recorded(*args, **kwargs):
            kw = {k: describe(v) for k, v in kwargs.items() if k != "progress"}
            calls.append((name, describe(args), tuple(sorted(kw.items()))))
            return fn(*args, **kwargs)
        monkeypatch.setattr(owner, name, recorded)

    for owner, name in [(minivar.Pipeline, "text_rows"), (minivar.Pipeline, "encode_text"), (Infinity, "condition"),
                        (pipeline_mod, "run_scale_loop"), (minivar.Pipeline, "decode"), (BSQVAE, "decode"),
                        (Decoder, "forward"), (pipeline_mod, "pixels_to_image"),
                        (bench, "system_malloc_for_large_buffers"), (bench, "keep_freed_memory")]:
        wrap(owner, name)
    return calls


def test_timed_round_makes_the_calls_of_a_direct_generate(monkeypatch):
    """One timed round of the bench and a user's `pipe.generate` with the same settings (generate's
    defaults, pruned, stage-aware CFG) call the same functions in the same order with the same
    arguments: the same latent layout reaches the decoder, and no allocator switch is made. The
    bench's phases are `Output.timings`' phases, and its per-scale and per-layer clocks saw every
    scale that ran."""
    subj = bench.pipeline_subject("tiny", with_vae=True)
    case = bench.Case("tiny", 256, prune=True, cfg_stop=True)
    plan = bench.plan_case(subj, case)
    calls = record_calls(monkeypatch)
    sample = bench.timed_once(subj, plan)
    timed = list(calls)
    calls.clear()
    out = subj.pipe.generate(bench.PROMPT, res=256, prune=True, cfg_stop_scale=plan.settings.cfg_stop_scale)
    direct = list(calls)

    names = [c[0] for c in direct]
    assert names == ["text_rows", "encode_text", "condition", "run_scale_loop", "decode", "decode", "forward",
                     "pixels_to_image"]
    assert timed == direct
    assert list(out.timings) == list(bench.PHASES) and set(bench.PHASES) <= set(sample)
    assert sample["total"] == pytest.approx(sum(sample[ph] for ph in bench.PHASES))
    assert out.scales == plan.scales and out.prune == plan.prune
    assert len(sample["scales"]) == len(sample["layers"]) == len(plan.counts) == len(plan.scales) - len(out.prune.skip)
    assert all(len(row) == subj.model.cfg.depth for row in sample["layers"])


def test_memory_pass_is_the_same_generation_with_the_decoder_under_system_malloc(monkeypatch):
    """The untimed memory pass runs the same calls, and is the only place where the decoder is wrapped
    in `system_malloc_for_large_buffers` (a no-op unless --keep-heap); every phase has a peak."""
    subj = bench.pipeline_subject("tiny", with_vae=True)
    plan = bench.plan_case(subj, bench.Case("tiny", 256, prune=False, cfg_stop=False))
    calls = record_calls(monkeypatch)
    mem = bench.memory_once(subj, plan)
    measured = list(calls)
    calls.clear()
    subj.pipe.generate(bench.PROMPT, res=256)
    i = [c[0] for c in measured].index("system_malloc_for_large_buffers")
    assert measured[i - 1][0] == "run_scale_loop" and measured[i + 1][0] == "decode"  # entered just around decoding
    assert measured[:i] + measured[i + 1:] == calls
    assert set(mem["peak"]) == set(bench.PHASES) and all(v > 0 for v in mem["peak"].values())
    assert "decode" not in vars(subj.pipe)  # the phase hook is gone again


def test_shape_subject_runs_generate_with_random_text_and_no_decoder():
    """A shape model is a Pipeline too: fixed random text rows stand in for T5, and without a VAE
    to decode generate stops at the latent (an empty VAE phase) while the VAE's config stays readable."""
    subj = bench.random_subject("tiny-shape", "custom", TINY, depth=2, vae=None, text_tokens=4)
    assert subj.vae is None and subj.pipe.vae.decoder.conv_in.conv.weight.is_meta
    kv, segments = subj.pipe.text_rows([bench.PROMPT], None, True)
    assert kv.shape == (8, TINY.text_channels) and segments == [(0, 4), (4, 8)]
    sample = bench.timed_once(subj, bench.plan_case(subj, bench.Case("tiny-shape", 256, False, False)))
    assert sample["vae"] < sample["transformer"] and len(sample["layers"][0]) == 2


def test_direct_mode_times_plain_generate_calls(tmp_path):
    bench.main(["--direct", "--subjects", "tiny", "--res", "256", "--prune", "on", "--no-vae", "--repeats", "1",
                "--warmup", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "direct.json").read_text())
    (run,) = report["runs"]
    assert run["label"] == "tiny 256 prune=on" and set(run["timings"]) == set(bench.PHASES)
    assert run["wall"] >= run["timings"]["transformer"]
    assert "Plain `Pipeline.generate` calls" in (tmp_path / "direct.md").read_text()


def test_reports_never_write_through_a_symlink_in_the_output_folder(tmp_path):
    """A link planted at a report's name (or at its old temporary's) is replaced, its target left alone."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("direct.json", "direct.md", ".direct.json.partial"):
        (out / name).symlink_to(victim)
    machine = {"cpu": "x", "logical_cpus": 1, "torch": "t", "cpu_capability": "c", "torch_threads": 1,
               "loadavg": [0.0], "loadavg_end": [0.0]}
    bench.write({"runs": [], "machine": machine}, out)
    assert victim.read_text() == "precious"
    assert json.loads((out / "direct.json").read_text())["runs"] == [] and not (out / "direct.json").is_symlink()


@pytest.mark.parametrize("args, says", [
    (["--subjects", "tiny", "bogus"], "invalid choice: 'bogus'"),
    (["--res", "1024", "333"], "--res 333: unsupported res=333"),
    (["--repeats", "0"], "--repeats 0: use 1 or more"),
    (["--warmup", "-1"], "--warmup -1: use 0 or more"),
    (["--threads", "0"], "--threads 0: use 1 or more"),
    (["--depth", "0"], "--depth 0: use 1 or more"),
    (["--text-tokens", "0"], "--text-tokens 0"),
    (["--device", "tpu"], "--device: device='tpu' is invalid"),
    (["--out", "{file}"], "is a file: give a folder"),
])
def test_bad_arguments_are_one_line_errors_before_any_model(tmp_path, capsys, args, says):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        bench.parse_args([a.format(file=tmp_path / "file") for a in args])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[-1].startswith("python -m minivar.bench: error:") and says in err[-1]
