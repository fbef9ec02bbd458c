"""Native cached token pruning: selection, restoration, KV bookkeeping, presets, stage-aware CFG, memory."""
import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import PROMPT, SETTINGS, TINY, rel_err, tiny_pipeline

import minivar
from minivar import pipeline
from minivar.model.config import BUDGETS, PRESETS, TEMPLATES, InfinityConfig, scale_schedule
from minivar.model.pruning import HIGH_RES_DROP, fastvar_literal, no_skip, proportional, reference_tokens, resolve_prune
from minivar.model.pruning import Pruner, PruneSchedule, pivotal_scores, restore, select
from minivar.model.sampling import Settings, plan


def test_kept_set_is_exactly_the_top_k_by_distance_from_the_mean():
    torch.manual_seed(0)
    x = torch.randn(3, 6 * 5, 16)
    scores = pivotal_scores(x, 6, 5)
    expected = ((x - x.mean(1, keepdim=True)) ** 2).sum(-1)
    assert torch.allclose(scores, expected, atol=1e-5)
    keep = select(scores, 11)
    for b in range(3):
        order = torch.argsort(scores[b], descending=True)
        assert keep[b].tolist() == order[:11].tolist()  # the set and its (descending) order


def test_restored_slots_come_from_the_cache_and_kept_slots_from_computation():
    torch.manual_seed(0)
    B, (hc, wc), (h, w), C, K = 2, (4, 4), (6, 8), 5, 9
    cached = torch.randn(B, hc * wc, C)
    keep = torch.stack([torch.randperm(h * w)[:K] for _ in range(B)])
    computed = torch.randn(B, K, C)
    out = restore(computed, keep, cached, (hc, wc), (h, w))
    base = F.adaptive_avg_pool2d(cached.view(B, hc, wc, C).permute(0, 3, 1, 2), (h, w)).permute(0, 2, 3, 1).reshape(B, h * w, C)
    for b in range(B):
        kept = torch.zeros(h * w, dtype=torch.bool)
        kept[keep[b]] = True
        assert torch.equal(out[b, keep[b]], computed[b])
        assert torch.allclose(out[b, ~kept], base[b, ~kept], atol=1e-6)


def run(layer_run, name, x, fn):
    """One sub-layer `fn(tokens, keep)` through a pruner's runner, as Block.forward runs it."""
    keep, t = layer_run.pick(x, name)
    return layer_run.fill(fn(t, keep), keep, name)


def test_pruned_runner_computes_only_kept_tokens():
    scales = [(2, 2), (4, 4)]
    schedule = PruneSchedule(drop={1: 0.5}, layers=(0, 0), cache_scale=0)
    pruner = Pruner(schedule, scales, record=True)
    x0, x1 = torch.randn(2, 4, 8), torch.randn(2, 16, 8)
    run(pruner.runner(0, 0), "sa", x0, lambda t, keep: t * 2)         # the cache scale stores outputs
    seen = {}
    out = run(pruner.runner(1, 0), "sa", x1, lambda t, keep: seen.setdefault("n", t.shape[1]) and t * 3)
    assert seen["n"] == 8 and out.shape == x1.shape
    keep = pruner.records[1].keep[0, "sa"]
    assert torch.equal(torch.gather(out, 1, keep[..., None].expand(-1, -1, 8)),
                       torch.gather(x1 * 3, 1, keep[..., None].expand(-1, -1, 8)))
    assert pruner.runner(1, 1) is not pruner.runner(1, 0)  # layer 1 is outside the window: dense


def test_kv_cache_holds_only_the_kept_tokens():
    out = tiny_pipeline().generate(PROMPT, res=1024, prune="fastvar", trace=True, output_type="latent", **SETTINGS)
    ref = json.loads((TINY / "fastvar_runs.json").read_text())["kv_cache_len_after_scale_per_layer"]
    for si, lens in zip(out.trace.index[:-1], out.trace.kv_len[:-1]):  # upstream also caches the last scale
        assert lens == ref[str(si)], si
    assert out.trace.kv_len[-1] == out.trace.kv_len[-2]  # nothing attends to the last scale: not stored


@pytest.mark.parametrize("model", ["infinity-2b", "infinity-8b"])
def test_every_preset_is_valid(model):
    cfg = PRESETS[model]
    for template in TEMPLATES:
        for res in [256, 512, 768, 1024, 1344, 2048]:
            scales = scale_schedule(res, template)
            p = resolve_prune(True, cfg, scales)
            p.validate(len(scales), cfg.depth)
            pruned = [si for si, f in p.drop.items() if f > 0]
            if pruned:
                assert p.cache_scale < min(pruned) and 0 <= p.layers[0] <= p.layers[1] < cfg.depth
            assert len(scales) - 1 not in p.skip or res <= 1024  # high resolution keeps its extra scale
            if res == 1024:  # the 1M budget always gets the full recipe at the same schedule positions
                assert (sorted(p.drop), sorted(p.skip), p.cache_scale) == ([9, 10], [11, 12], 8), template


def test_the_2b_preset_at_1024_is_fastvars_released_recipe():
    scales = scale_schedule(1024, 1.0)
    preset = resolve_prune(True, PRESETS["infinity-2b"], scales)
    assert preset == fastvar_literal(scales)
    assert preset.layers == (3, 27) and preset.drop == {9: 0.4, 10: 0.5} and preset.skip == {11, 12}
    assert proportional(scales, 40, 64 * 64).layers == (4, 34)  # 8B: window scaled with depth


def test_preset_fits_every_depth():
    scales = scale_schedule(1024)
    for depth in range(1, 49):
        proportional(scales, depth, 64 * 64).validate(len(scales), depth)
        resolve_prune("fastvar", replace(PRESETS["infinity-2b"], depth=depth + 3), scales).validate(len(scales), depth + 3)


def test_fastvar_literal_needs_a_24x24_scale():
    with pytest.raises(ValueError, match="24x24"):
        fastvar_literal([(1, 1), (8, 8), (16, 16), (32, 32), (48, 48)])  # a square list without 24x24
    assert fastvar_literal(scale_schedule(512, 1.0)).drop == {9: 0.4}  # 0.25M: 32x32 pruned from 24x24


@pytest.mark.parametrize("h_div_w", [0.75, 0.5, 1.333, 2.0, 0.333])
def test_fastvar_literal_refuses_non_square_schedules_with_one_line(h_div_w):
    """At h/w 0.75 the literal widths would skip the middle 36x48 scale and run 45x60 and 54x72."""
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="square") as e:
        pipe.generate(PROMPT, res=1024, h_div_w=h_div_w, prune="fastvar", output_type="latent", **SETTINGS)
    assert "\n" not in str(e.value) and "prune=True" in str(e.value)


def test_preset_treats_every_aspect_of_a_low_budget_model_alike():
    """The toy (trained at 0.06M, a 16x16 native grid) prunes every aspect at the same place of its 7
    scales: the last scale, in every layer, from the cache of the scale before it; nothing skipped."""
    toy = InfinityConfig(depth=4, embed_dim=128, num_heads=2, pn="0.06M")
    for template in TEMPLATES:
        scales = scale_schedule("0.06M", template)
        s = resolve_prune(True, toy, scales)
        assert (sorted(s.drop), s.cache_scale, s.skip, s.layers) == ([6], 5, frozenset(), (0, 3)), template


def test_random_selector_keeps_the_sampling_stream():
    pipe = tiny_pipeline()
    random = PruneSchedule(drop={9: 0.4, 10: 0.5}, skip=frozenset({11, 12}), layers=(3, 3), cache_scale=8,
                           selector="random")
    a = pipe.generate(PROMPT, res=1024, prune=random, trace=True, output_type="latent", **SETTINGS)
    b = pipe.generate(PROMPT, res=1024, prune="fastvar", trace=True, output_type="latent", **SETTINGS)
    for i in range(9):  # identical until pruning starts: the selector drew from its own generator
        assert torch.equal(a.trace.bits[i], b.trace.bits[i])
    assert not torch.equal(a.trace.pruning[9].keep[3, "sa"], b.trace.pruning[9].keep[3, "sa"])
    again = pipe.generate(PROMPT, res=1024, prune=random, output_type="latent", **SETTINGS)
    assert torch.equal(a.summed_codes, again.summed_codes)  # reproducible from the seed


def test_stage_aware_cfg_runs_the_late_scales_on_the_conditional_rows_only():
    pipe = tiny_pipeline()
    full = pipe.generate(PROMPT, res=256, trace=True, **SETTINGS)
    staged = pipe.generate(PROMPT, res=256, trace=True, cfg_stop_scale=4, **SETTINGS)
    assert full.trace.cfg_rows == [2] * 7 and staged.trace.cfg_rows == [2] * 4 + [1] * 3
    for i in range(4):
        assert torch.equal(full.trace.bits[i], staged.trace.bits[i])
    assert not torch.equal(full.trace.logits[4], staged.trace.logits[4])  # unguided from scale 4 on


def test_stage_aware_cfg_with_pruning_restores_from_the_conditional_rows():
    """Issue 17, bug 1: dropping the unconditional half must trim the restoration cache too. From the
    stop on, the run must match one whose guidance is off there (cfg 1 samples the conditional rows)."""
    pipe, kw = tiny_pipeline(), {**SETTINGS, "trace": True, "output_type": "latent", "res": 512, "prune": "fastvar"}
    staged = pipe.generate(PROMPT, cfg_stop_scale=9, **kw)  # cache scale 8, pruned scale 9
    assert staged.prune.cache_scale == 8 and staged.prune.drop == {9: 0.4}
    assert staged.trace.cfg_rows == [2] * 9 + [1]
    unguided = pipe.generate(PROMPT, **{**kw, "cfg": [3.0] * 9 + [1.0]})
    for i in range(9):
        assert torch.equal(staged.trace.bits[i], unguided.trace.bits[i])
    assert rel_err(staged.trace.logits[9], unguided.trace.logits[9]) <= 1e-5


def test_stage_aware_cfg_with_pruning_is_batch_invariant():
    pipe, prompts = tiny_pipeline(), [PROMPT, "a cat"]
    kw = {**SETTINGS, "trace": True, "output_type": "latent", "res": 512, "prune": "fastvar", "cfg_stop_scale": 9}
    singles = [pipe.generate(p, **kw) for p in prompts]
    forced = [torch.cat([s.trace.bits[i] for s in singles]) for i in range(len(singles[0].trace.bits))]
    batch = pipe.generate(prompts, force_bits=forced, **kw)
    for i in (8, 9):  # the cache scale, and the pruned scale that runs on the conditional rows only
        for b, single in enumerate(singles):
            assert rel_err(batch.trace.logits[i][b], single.trace.logits[i][0]) <= 1e-5, (i, b)


def test_stage_aware_cfg_stops_at_a_skipped_scale_too():
    """A stop scale that pruning skips still stops guidance from there on (it used to be ignored)."""
    skip_late = PruneSchedule(skip=frozenset({5, 6}))
    out = tiny_pipeline().generate(PROMPT, res=256, prune=skip_late, cfg_stop_scale=5, trace=True,
                                   output_type="latent", **SETTINGS)
    assert out.trace.index == [0, 1, 2, 3, 4] and out.trace.cfg_rows == [2] * 5


def test_prune_true_follows_the_model_config_not_its_folder_name(tmp_path):
    """Issue 17, bug 4: the toy's files under another name must give the toy's preset, not no pruning."""
    from minivar.loading.hub import find_directory

    toy = find_directory("toy")
    shutil.copytree(toy, tmp_path / "my-toy")
    kw = {**SETTINGS, "prune": True, "output_type": "latent"}
    named = minivar.load("toy").generate(PROMPT, **kw)
    renamed = minivar.load(tmp_path / "my-toy").generate(PROMPT, **kw)
    assert renamed.prune == named.prune and renamed.prune.prunes and renamed.prune.drop
    assert torch.equal(renamed.summed_codes, named.summed_codes)


def test_reference_grid_comes_from_the_trained_budget():
    cfg = PRESETS["infinity-2b"]
    assert reference_tokens(cfg, 1.0) == 64 * 64 and reference_tokens(replace(cfg, pn="0.06M"), 1.0) == 16 * 16
    assert reference_tokens(replace(cfg, pn="0.25M"), 1.0) == 32 * 32
    with pytest.raises(ValueError, match="pn='2M'"):
        reference_tokens(replace(cfg, pn="2M"), 1.0)


@pytest.mark.parametrize("h_div_w", [1.0, 0.5])
def test_zero_shot_2048_with_pruning(h_div_w):
    out = tiny_pipeline().generate(PROMPT, res=2048, h_div_w=h_div_w, prune=True, trace=True, **SETTINGS)
    assert out.image.size == ((2048, 2048) if h_div_w == 1.0 else (2048, 1024))
    assert out.trace.scales[-1] == out.scales[-1] and max(out.scales[-1]) == 128
    assert out.prune.prunes and not out.prune.skip


def test_memory_refusal_is_a_clear_message(monkeypatch):
    monkeypatch.setattr(pipeline, "available_bytes", lambda device: 512 * 1024**2)
    with pytest.raises(MemoryError) as err:
        tiny_pipeline().generate(PROMPT, res=2048, output_type="latent", **SETTINGS)
    msg = str(err.value)
    assert "\n" not in msg and "GiB" in msg and "prune=True" in msg


def test_memory_estimate_shrinks_with_pruning():
    cfg, scales = PRESETS["infinity-2b"], scale_schedule(1024)
    from minivar.model.vae import VAE_PRESETS
    guided = Settings(cfg=3.0)
    dense = pipeline.estimate(plan(cfg, scales, 1.0, guided, PruneSchedule.none()), cfg, VAE_PRESETS["d32"], 1)
    pruned = pipeline.estimate(plan(cfg, scales, 1.0, guided, resolve_prune(True, cfg, scales)), cfg, VAE_PRESETS["d32"], 1)
    # 2 x rows x tokens x C x 4 bytes, summed over layers; the last scale is never stored
    assert dense.kv_cache == 2 * 2 * sum(h * w for h, w in scales[:-1]) * 32 * 2048 * 4
    assert pruned.kv_cache < 0.4 * dense.kv_cache


def test_memory_estimate_holds_the_largest_joined_keys_and_values(monkeypatch):
    """The last scale joins every cached key with its own (`KVCache.extend` without storing). With a
    layer window the layers outside it join the most; the estimate read layer 0 (in the window here,
    as in any window from layer 0): 0.19 GiB estimated against 0.32 real on the 2B."""
    from minivar.model.transformer import KVCache

    joined, extend = [], KVCache.extend

    def spy(self, k, v, store=True):
        out = extend(self, k, v, store)
        joined.extend([] if store else [out[0].numel() + out[1].numel()])
        return out

    monkeypatch.setattr(KVCache, "extend", spy)
    schedule, pipe = PruneSchedule(drop={5: 0.5, 6: 0.5}, layers=(0, 1), cache_scale=4), tiny_pipeline()
    out = pipe.generate(PROMPT, res=256, prune=schedule, output_type="latent", **SETTINGS)
    cfg = pipe.transformer.cfg
    the_plan = plan(cfg, out.scales, 1.0, Settings(**SETTINGS), schedule)
    assert len(joined) == cfg.depth and joined[0] < max(joined)
    assert pipeline.estimate(the_plan, cfg, pipe.vae.cfg, images=1).joined_kv == 4 * max(joined)  # float32 bytes


@pytest.mark.parametrize("stop", [None, 8, 9], ids=["no-stop", "stop-at-the-cache-scale", "stop-after-it"])
def test_restoration_cache_bytes_follow_the_plan(monkeypatch, stop):
    """The restoration cache the scale loop holds (its storage: past a later stop the rows that run are a
    view) is the plan's: one half of the rows when guidance stopped at or before the cache scale."""
    pruners, init = [], Pruner.__init__
    monkeypatch.setattr(Pruner, "__init__", lambda self, *a, **k: (init(self, *a, **k), pruners.append(self))[0])
    pipe, cfg = tiny_pipeline(), tiny_pipeline().transformer.cfg
    out = pipe.generate(PROMPT, res=1024, prune=True, cfg_stop_scale=stop, output_type="latent", **SETTINGS)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in pruners[0].cache.values()}
    the_plan = plan(cfg, out.scales, 1.0, Settings(**SETTINGS, cfg_stop_scale=stop), out.prune)
    assert pipeline.restore_cache_bytes(the_plan, cfg, images=1) == sum(storages.values()) > 0


def test_budgets_table():
    assert {b: len(scale_schedule(b)) for b in BUDGETS} == {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def test_no_skip_placed_on_harts_schedule_is_fastvars_hart_recipe():
    """no_skip is a recipe of FastVAR's HART kind: at HART's share (0.47) and drops, on HART's own 1024
    schedule (64x64 reference), it picks the same scales, drops, cache and layers as the released recipe."""
    from minivar.hart.config import SCHEDULE_1024
    from minivar.hart.sampling import fastvar_hart

    scales = [(pn, pn) for pn in SCHEDULE_1024]
    for depth in (4, 24, 30):
        assert no_skip(scales, depth, 64 * 64, from_share=0.47, drops=(0.5, 0.75)) == fastvar_hart(depth, SCHEDULE_1024)


def test_only_small_native_grids_get_the_no_skip_preset():
    for name in ("infinity-2b", "infinity-8b"):  # 64x64 native grid: FastVAR's Infinity recipe at every budget
        cfg = PRESETS[name]
        for budget in BUDGETS:
            scales = scale_schedule(budget)
            assert resolve_prune(True, cfg, scales) == proportional(scales, cfg.depth, 64 * 64), (name, budget)
