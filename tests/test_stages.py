"""Stage-aware acceleration (StageVAR, issue 21): the stage split, the projection selector, CFG dropped
in the refinement stage together with pruning, and the prune="stagevar" preset."""
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
from helpers import PROMPT, SETTINGS, rel_err, tiny_pipeline

import minivar
from minivar import pipeline
from minivar.bench.analysis import low_band_changes
from minivar.model.config import BUDGETS, HIGH_RES, PRESETS, TEMPLATES, scale_schedule
from minivar.bench.flops import totals, transformer_count
from minivar.loading.hub import SHIPPED
from minivar.model.pruning import SMALL_GRID, model_stages, proportional, reference_tokens, resolve_prune, stages
from minivar.model.pruning import Pruner, PruneSchedule, pivotal_scores, projection_matrix, projection_scores, select
from minivar.model.sampling import Settings, plan
from minivar.model.vae import VAE_PRESETS

ORDER = {"semantic": 0, "structure": 1, "refinement": 2}
MODELS = [PRESETS["infinity-2b"], PRESETS["infinity-8b"], replace(PRESETS["infinity-2b"], depth=4, pn="0.06M")]


@lru_cache(maxsize=None)
def toy() -> minivar.Pipeline:
    if not (SHIPPED["toy"] / "infinity.pth").exists():
        pytest.skip("the toy model is not built (python -m minivar.toy.train --out minivar/toy/weights)")
    return minivar.load("toy")


def every_schedule():
    for cfg in MODELS:
        for template in TEMPLATES:
            for budget in [*BUDGETS, *HIGH_RES]:
                yield cfg, template, budget, scale_schedule(budget, template)


# --------------------------------------------------------------------------------------------------
# The stage split
# --------------------------------------------------------------------------------------------------
def test_stage_split_on_every_template_budget_and_model():
    for cfg, template, budget, scales in every_schedule():
        labels = model_stages(cfg, scales)
        where = (cfg.pn, template, budget)
        assert len(labels) == len(scales) and labels[0] == "semantic", where
        assert [ORDER[s] for s in labels] == sorted(ORDER[s] for s in labels), where  # never goes back
        preset = resolve_prune(True, cfg, scales)
        for si in [*preset.drop, *preset.skip]:  # FastVAR's pruned and skipped scales are all refinement
            assert labels[si] == "refinement", (where, si)
        if reference_tokens(cfg, 1.0) < SMALL_GRID:  # no_skip: the cache is the scale before the pruned ones
            assert not preset.skip and (not preset.drop or preset.cache_scale == min(preset.drop) - 1), where
            continue
        if preset.cache_scale is not None:  # the restoration cache is the last scale before refinement
            assert labels[preset.cache_scale] != "refinement" and labels[preset.cache_scale + 1] == "refinement"
        if budget == cfg.pn:  # the trained budget: refinement starts at FastVAR's first pruned or skipped scale
            assert labels.index("refinement") == min([*preset.drop, *preset.skip]) and "structure" in labels, where
            assert cfg.pn != "1M" or labels.index("refinement") == 9, where  # 32x32 at 1:1, its peer elsewhere


def test_stages_at_known_schedules():
    infinity, toy_cfg = PRESETS["infinity-2b"], MODELS[2]
    one_k = stages(scale_schedule(1024), reference_tokens(infinity, 1.0))
    assert one_k == ["semantic"] * 7 + ["structure"] * 2 + ["refinement"] * 4  # 16x16 | 20, 24 | 32 ..
    assert set(stages(scale_schedule(256), reference_tokens(infinity, 1.0))) == {"semantic"}
    toy_stages = stages(scale_schedule("0.06M"), reference_tokens(toy_cfg, 1.0))
    assert toy_stages == ["semantic"] * 3 + ["structure"] + ["refinement"] * 3  # 4x4 | 6x6 | 8x8 ..


def test_output_and_trace_show_each_scales_stage():
    out = tiny_pipeline().generate(PROMPT, res=512, prune="stagevar", trace=True, output_type="latent", **SETTINGS)
    assert out.stages == stages(out.scales, reference_tokens(tiny_pipeline().transformer.cfg, 1.0))
    assert out.trace.stage == [out.stages[si] for si in out.trace.index] and out.trace.stage[-1] == "refinement"


# --------------------------------------------------------------------------------------------------
# The projection selector
# --------------------------------------------------------------------------------------------------
def test_projection_at_full_rank_ranks_like_pivotal():
    torch.manual_seed(0)
    x = torch.randn(2, 6 * 5, 16) * torch.linspace(0.2, 3, 16)
    full = projection_scores(x, 6, 5, projection_matrix(16, 16, seed=3))
    assert torch.allclose(full, pivotal_scores(x, 6, 5), rtol=1e-5)
    assert torch.equal(select(full, 12), select(pivotal_scores(x, 6, 5), 12))
    assert projection_matrix(16, 64, seed=3).shape == (16, 16)  # a rank above the width is the full rotation


def test_projection_matrix_is_orthonormal_and_fixed_by_its_seed():
    a, b, c = projection_matrix(32, 4, 7), projection_matrix(32, 4, 7), projection_matrix(32, 4, 8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.allclose(a.T @ a, torch.eye(4), atol=1e-6)


def test_low_rank_projection_keeps_a_different_set_deterministically_per_seed():
    torch.manual_seed(0)
    scales, x = [(2, 2), (6, 6)], torch.randn(1, 36, 32)
    schedule = PruneSchedule(drop={1: 0.5}, layers=(0, 0), cache_scale=0, selector="projection", rank=2)

    def kept(seed):
        pruner = Pruner(schedule, scales, seed=seed, record=True)
        for si, tokens in ((0, torch.randn(1, 4, 32)), (1, x)):  # the cache scale, then the pruned one
            run = pruner.runner(si, 0)
            keep, t = run.pick(tokens, "sa")
            run.fill(t, keep, "sa")
        return set(pruner.records[1].keep[0, "sa"][0].tolist())

    pivotal = set(select(pivotal_scores(x, 6, 6), 18)[0].tolist())
    assert kept(0) == kept(0) and kept(0) != kept(1)
    assert kept(0) != pivotal and len(kept(0)) == 18


def test_keep_all_projection_schedule_equals_no_pruning_bit_for_bit():
    keep_all = PruneSchedule(drop={9: 0.0}, layers=(0, 3), cache_scale=8, selector="projection", rank=2)
    kw = {**SETTINGS, "res": 512, "trace": True, "output_type": "latent"}
    a, b = (tiny_pipeline().generate(PROMPT, prune=p, **kw) for p in (keep_all, False))
    assert torch.equal(a.summed_codes, b.summed_codes)
    assert all(torch.equal(x, y) for x, y in zip(a.trace.logits, b.trace.logits))


# --------------------------------------------------------------------------------------------------
# CFG dropped in the refinement stage, with pruning
# --------------------------------------------------------------------------------------------------
def test_stagevar_preset_is_prune_true_plus_projection_and_the_refinement_cfg_stop():
    for cfg, template, budget, scales in every_schedule():
        sv = resolve_prune("stagevar", cfg, scales)
        sv.validate(len(scales), cfg.depth)
        labels = model_stages(cfg, scales)
        first = labels.index("refinement") if "refinement" in labels else None
        assert sv.selector == "projection" and sv.cfg_stop == first, (cfg.pn, template, budget)
        assert replace(sv, selector="pivotal", cfg_stop=None) == resolve_prune(True, cfg, scales)


def test_cfg_stop_past_the_last_scale_equals_full_cfg():
    pipe, kw = tiny_pipeline(), {**SETTINGS, "res": 256, "trace": True, "output_type": "latent"}
    full = pipe.generate(PROMPT, **kw)
    for stopped in (pipe.generate(PROMPT, cfg_stop_scale=7, **kw), pipe.generate(PROMPT, prune={"cfg_stop": 7}, **kw)):
        assert stopped.trace.cfg_rows == [2] * 7 and torch.equal(stopped.summed_codes, full.summed_codes)
        assert all(torch.equal(x, y) for x, y in zip(stopped.trace.logits, full.trace.logits))


def test_explicit_cfg_stop_scale_overrides_the_presets():
    pipe, kw = tiny_pipeline(), {**SETTINGS, "res": 512, "trace": True, "output_type": "latent"}
    guided = pipe.generate(PROMPT, prune="stagevar", cfg_stop_scale=10, **kw)  # 10 = past the last scale
    assert guided.prune.cfg_stop == 9 and guided.trace.cfg_rows == [2] * 10
    same = pipe.generate(PROMPT, prune=replace(guided.prune, cfg_stop=None), **kw)
    assert torch.equal(guided.summed_codes, same.summed_codes)


def test_stagevar_drops_cfg_on_the_pruned_scale_and_restores_from_the_conditional_rows():
    """From the stop on the run must equal one whose guidance is off there (cfg 1 samples the conditional
    rows): this holds only if the restoration cache and the KV caches were cut to the conditional rows."""
    pipe, kw = tiny_pipeline(), {**SETTINGS, "trace": True, "output_type": "latent", "res": 512}
    staged = pipe.generate(PROMPT, prune="stagevar", **kw)
    p = staged.prune
    assert (p.cache_scale, p.drop, p.cfg_stop, p.selector) == (8, {9: 0.4}, 9, "projection")
    assert staged.trace.cfg_rows == [2] * 9 + [1]
    unguided = pipe.generate(PROMPT, prune=replace(p, cfg_stop=None), **{**kw, "cfg": [3.0] * 9 + [1.0]})
    assert all(torch.equal(a, b) for a, b in zip(staged.trace.bits[:9], unguided.trace.bits[:9]))
    assert rel_err(staged.trace.logits[9], unguided.trace.logits[9]) <= 1e-5
    assert torch.equal(staged.trace.pruning[9].keep[1, "sa"], unguided.trace.pruning[9].keep[1, "sa"][:1])


def test_stagevar_is_batch_invariant():
    pipe, prompts = tiny_pipeline(), [PROMPT, "a cat"]
    kw = {**SETTINGS, "trace": True, "output_type": "latent", "res": 512, "prune": "stagevar"}
    singles = [pipe.generate(p, **kw) for p in prompts]
    forced = [torch.cat([s.trace.bits[i] for s in singles]) for i in range(len(singles[0].trace.bits))]
    batch = pipe.generate(prompts, force_bits=forced, **kw)
    for b, single in enumerate(singles):
        assert torch.equal(batch.trace.pruning[9].keep[2, "ffn"][b], single.trace.pruning[9].keep[2, "ffn"][0])
        for i in (8, 9):  # the cache scale, and the pruned scale run on the conditional rows only
            assert rel_err(batch.trace.logits[i][b], single.trace.logits[i][0]) <= 1e-5, (i, b)


def test_stagevar_on_the_toy_at_256_is_deterministic_per_seed():
    pipe = toy()
    a, b, c = (pipe.generate("two red circles", prune="stagevar", seed=s, trace=True) for s in (5, 5, 6))
    assert a.trace.cfg_rows == [2, 2, 2, 2, 1, 1, 1] and a.trace.index == [0, 1, 2, 3, 4, 5, 6]
    assert torch.equal(a.summed_codes, b.summed_codes) and a.image.tobytes() == b.image.tobytes()
    assert not torch.equal(a.summed_codes, c.summed_codes)
    pruned = pipe.generate("two red circles", prune=True, seed=5, trace=True)
    assert all(torch.equal(x, y) for x, y in zip(a.trace.bits[:4], pruned.trace.bits[:4]))  # same until refinement


# --------------------------------------------------------------------------------------------------
# Accounting and analysis
# --------------------------------------------------------------------------------------------------
def test_flops_of_stagevar_halve_the_refinement_rows_and_count_the_projection():
    cfg, scales = PRESETS["infinity-2b"], scale_schedule(1024)
    pruned, sv = (transformer_count(cfg, scales, resolve_prune(p, cfg, scales)) for p in (True, "stagevar"))
    assert [c.rows for c in sv] == [2] * 9 + [1, 1] and [c.rows for c in pruned] == [2] * 11
    select_flops = totals(sv)["select"].flops
    per_token = 2 * 2048 * 8 * 3 * 25  # rank-8 sketch of 2048 wide tokens, 3 sub-layers of 25 window layers
    assert select_flops == (32 * 32 + 40 * 40) * per_token  # one row each: both pruned scales are past the stop
    ratio = sum(c.total.flops for c in pruned) / sum(c.total.flops for c in sv)
    assert 1.2 < ratio < 2


def test_memory_estimate_follows_the_cfg_stop():
    cfg, scales, vae = PRESETS["infinity-2b"], scale_schedule(1024), VAE_PRESETS["d32"]
    def estimate(prune, stop=None):
        return pipeline.estimate(plan(cfg, scales, 1.0, Settings(cfg=3.0, cfg_stop_scale=stop), prune), cfg, vae, 1)

    pruned, sv = (estimate(resolve_prune(p, cfg, scales)) for p in (True, "stagevar"))
    assert sv.kv_cache == pruned.kv_cache and sv.activations < pruned.activations
    explicit = estimate(resolve_prune(True, cfg, scales), stop=9)
    assert explicit.activations == sv.activations


def test_low_band_changes_locate_where_the_coarse_content_is_decided():
    torch.manual_seed(0)
    coarse = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4), size=(32, 32), mode="bilinear")
    fine = 0.3 * torch.randn(1, 3, 32, 32)
    maps = [0.5 * coarse, coarse, coarse + fine]  # the low band settles at step 1, step 2 adds only detail
    change, settled = low_band_changes(maps)
    assert change[0] == pytest.approx(0.25, rel=0.05) and change[1] == pytest.approx(0.25, rel=0.05)
    assert change[2] < 0.02 and settled[1] > 0.98 and settled[2] == pytest.approx(1.0)


def test_bench_runs_the_issue_arms_and_compares_each_with_unpruned():
    from minivar.bench import run as bench

    args = bench.parse_args(["--prune", "off,on,stagevar", "--cfg-stop", "off,refine"])
    assert args.prune == [False, True, "stagevar"] and args.cfg_stop == [False, "refine"]
    assert bench.refinement_cfg_stop(PRESETS["infinity-2b"], scale_schedule(1024)) == 9  # 32x32
    assert bench.Case("s", 1024, True, "refine").label == "s 1024 prune=on cfg-stop@refine"
    arms = [bench.Case("s", 1024, p, c) for p in args.prune for c in args.cfg_stop]
    kept = [(c.prune, c.cfg_stop) for c in arms if not bench.redundant(c, arms)]
    assert kept == [(False, False), (False, "refine"), (True, False), (True, "refine"), ("stagevar", False)]

    def case(prune, stop, seconds):
        return {"subject": "s", "res": 1024, "prune_on": prune, "cfg_stop_on": stop,
                "label": bench.Case("s", 1024, prune, stop).label, "flops": {"transformer_flops": seconds},
                "time": {k: {"median": seconds} for k in ("total", "transformer")}, "peak_bytes": {"vae": {"median": 1}}}
    cases = [case(p, s, t) for p, s, t in [(False, False, 8.0), (True, False, 2.0), ("stagevar", False, 1.0),
                                           (True, "refine", 1.6)]]
    rows = {(r["what"], r["variant"]): r["speedup_total"] for r in bench.compare_cases(cases)}
    assert rows[("prune", "s 1024 prune=on")] == 4.0 and rows[("stagevar", "s 1024 prune=stagevar")] == 8.0
    assert rows[("prune+cfg-stop@refine", "s 1024 prune=on cfg-stop@refine")] == 5.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--prune", "off,fast"])


def test_unconditional_branch_after_a_stop_at_scale_0_starts_from_the_null_start_token():
    """A stop at scale 0 hands over before the start tokens are used: the unconditional branch must
    take its own (from the null text), giving exactly the logits that guidance scale 0 gives there."""
    pipe, kw = tiny_pipeline(), {**SETTINGS, "res": 256, "trace": True, "output_type": "latent"}
    n = len(pipe.schedule(256, 1.0))
    null = pipe.generate(PROMPT, prune=PruneSchedule(cfg_stop=0, cfg_stop_branch="unconditional"), **kw)
    prompt = pipe.generate(PROMPT, prune=PruneSchedule(cfg_stop=0), **kw)
    kw["cfg"] = [0.0] + [SETTINGS["cfg"]] * (n - 1)
    guided_0 = pipe.generate(PROMPT, **kw)                       # cfg 0 at scale 0: the unconditional logits
    assert null.trace.cfg_rows == [1] * n
    assert rel_err(null.trace.logits[0], guided_0.trace.logits[0]) < 1e-5
    assert rel_err(prompt.trace.logits[0], guided_0.trace.logits[0]) > 1e-2  # the prompt's own logits differ


def test_cfg_stop_branch_is_checked():
    with pytest.raises(ValueError, match="cfg_stop_branch"):
        tiny_pipeline().generate(PROMPT, res=256, prune={"cfg_stop": 3, "cfg_stop_branch": "null"}, **SETTINGS)


@pytest.mark.parametrize("pn", ["1.8M", "4M"])
def test_trace_names_the_stages_for_a_model_trained_at_a_high_resolution_budget(pn, monkeypatch):
    pipe = tiny_pipeline()
    monkeypatch.setattr(pipe.transformer, "cfg", replace(pipe.transformer.cfg, pn=pn))
    out = pipe.generate(PROMPT, res=256, trace=True, output_type="latent", **SETTINGS)
    assert out.trace.stage == ["semantic"] * len(out.trace.index)  # 256 is all semantic for a 1.8M+ model
    assert len(out.stages) == len(out.scales)
