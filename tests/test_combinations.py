"""The scale loop over an exhaustive table on the tiny fixture: pruning x stage-aware CFG x aspect x budget.

prune is off, the preset (True), FastVAR's literal recipe, StageVAR's preset (its own CFG stop at the
refinement stage, projection selector), a random-selector schedule or a keep-all schedule; cfg_stop_scale is None or any scale of the schedule; three aspect templates; two budgets.
Every combination must run and keep the loop's bookkeeping (rows, KV cache, skipped scales); a
keep-all schedule must equal no pruning bit for bit, and a stop beyond the last scale must equal full CFG.

Budgets are prefixes of a template's scale list (as Infinity's budgets are): the 7 scales of 0.06M and
the first 5. The full product at 0.25M costs about 65 CPU-seconds, too much for the suite. At these
sizes the preset is resolved as for a model trained at 0.06M (the toy's budget), so that it prunes
and skips here; FastVAR's literal recipe needs a 32-wide scale and stays a no-op (test_pruning covers it),
and it runs on the square aspect only (it refuses the others).

The loop is called directly (the text is encoded once) with one intra-op thread: these runs are tiny,
and on a busy machine a second thread mostly waits.
"""
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
from helpers import PROMPT, SETTINGS, tiny_pipeline

from minivar.model.config import TEMPLATES, nearest_template, scale_schedule
from minivar.model.pruning import resolve_prune
from minivar.model.pruning import PruneSchedule
from minivar.model.sampling import Settings, Trace, plan, run_scale_loop
from minivar.parity import image_batch

PRUNES = ["off", "preset", "fastvar", "stagevar", "random", "keep-all"]
ASPECTS = [1.0, 0.5, 1.333]        # h/w templates: square, 2:1 wide, 3:4 tall
BUDGETS = [5, 7]                   # scales: the first 5, and all 7 of 0.06M


def scales_for(budget: int, aspect: float) -> list[tuple[int, int]]:
    return TEMPLATES[nearest_template(aspect)][:budget]


def schedule_for(prune: str, scales: list[tuple[int, int]], template: float, depth: int) -> PruneSchedule:
    n = len(scales)
    if prune == "random":  # the ablation selector; also skips the last scale
        return PruneSchedule(drop={n - 2: 0.5}, skip=frozenset({n - 1}), layers=(1, depth - 2), cache_scale=n - 3,
                             selector="random")
    if prune == "keep-all":  # the pruning machinery, dropping nothing: a ratio of 0, and one too small for a token
        return PruneSchedule(drop={n - 2: 0.0, n - 1: 1e-9}, layers=(0, depth - 1), cache_scale=n - 3)
    word = {"off": False, "preset": True, "fastvar": "fastvar", "stagevar": "stagevar"}[prune]
    return resolve_prune(word, replace(tiny_pipeline().transformer.cfg, pn="0.06M"), scales)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@lru_cache(maxsize=None)
def text_rows():
    return tiny_pipeline().text_rows([PROMPT], None, cfg_on=True)


@lru_cache(maxsize=None)
def run(prune: str, stop: int | None, aspect: float, budget: str):
    """(schedule, trace, summed codes) of one combination; each runs once, later tests reuse it."""
    model = tiny_pipeline().transformer
    scales, template = scales_for(budget, aspect), nearest_template(aspect)
    schedule = schedule_for(prune, scales, template, model.cfg.depth)
    settings = Settings(**SETTINGS, cfg_stop_scale=stop)
    trace = Trace()
    with torch.no_grad(), image_batch(1):
        summed = run_scale_loop(model, model.condition(*text_rows()), 1, plan(model.cfg, scales, template, settings, schedule),
                                settings, trace)
    return schedule, trace, summed


def applies(prune: str, aspect: float) -> bool:
    """FastVAR's literal recipe refuses non-square schedules (test_pruning checks the refusal)."""
    return prune != "fastvar" or aspect == 1.0


COMBINATIONS = [(p, stop, a, b) for b in BUDGETS for a in ASPECTS for p in PRUNES
                for stop in [None, *range(b)] if applies(p, a)]


@pytest.mark.parametrize("prune, stop, aspect, budget", COMBINATIONS)
def test_every_combination_runs(prune, stop, aspect, budget):
    schedule, trace, summed = run(prune, stop, aspect, budget)
    scales = scales_for(budget, aspect)
    ran = [si for si in range(len(scales)) if si not in schedule.skip]
    assert trace.index == ran
    stop = schedule.guidance_stop(stop)  # stagevar brings its own stop; an explicit one wins
    assert trace.cfg_rows == [2 if stop is None or si < stop else 1 for si in ran]
    H, W = scales[-1]
    assert summed.shape == (1, 32, 1, H, W) and torch.isfinite(summed).all()
    # each layer's KV cache holds exactly the tokens it computed at the scales before the last one that ran
    for step in range(len(ran)):
        stored = ran[: step + 1] if step < len(ran) - 1 else ran[:-1]
        expected = [sum(schedule.kept(si, li, scales[si][0] * scales[si][1]) for si in stored) for li in range(4)]
        assert trace.kv_len[step] == expected, (step, ran[step])


@pytest.mark.parametrize("stop", [None, *range(max(BUDGETS))])
@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_keep_all_schedule_equals_no_pruning_bit_for_bit(stop, aspect, budget):
    if stop is not None and stop >= budget:
        pytest.skip("no such scale in this budget")
    _, base, base_summed = run("off", stop, aspect, budget)
    _, same, same_summed = run("keep-all", stop, aspect, budget)
    assert all(torch.equal(a, b) for a, b in zip(base.logits, same.logits))
    assert all(torch.equal(a, b) for a, b in zip(base.bits, same.bits))
    assert torch.equal(base_summed, same_summed)


@pytest.mark.parametrize("prune", [p for p in PRUNES if p != "stagevar"])  # its own stop: see test_stages
@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_stop_beyond_the_last_scale_equals_full_cfg(prune, aspect, budget):
    if not applies(prune, aspect):
        pytest.skip("prune='fastvar' is for square schedules")
    _, full, full_summed = run(prune, None, aspect, budget)
    _, late, late_summed = run(prune, budget, aspect, budget)
    assert late.cfg_rows == full.cfg_rows and set(full.cfg_rows) == {2}
    assert all(torch.equal(a, b) for a, b in zip(full.logits, late.logits))
    assert torch.equal(full_summed, late_summed)


def test_the_table_exercises_pruning_and_skipping():
    """Guard against a table of no-ops: the preset and the random schedule really prune and skip here."""
    assert all(scales_for(7, a) == scale_schedule("0.06M", a) for a in ASPECTS)
    schedules = {(p, a, b): run(p, None, a, b)[0] for p in PRUNES for a in ASPECTS for b in BUDGETS if applies(p, a)}
    # a 16x16 native grid takes the no-skip preset: 16x16 pruned from 12x12's cache, nothing skipped;
    # on the first 5 scales (up to 8x8, share 0.25) no scale reaches its share of 1.0
    assert all(schedules["preset", a, 7].prunes and not schedules["preset", a, 7].skip for a in ASPECTS)
    assert not any(schedules["preset", a, 5].prunes for a in ASPECTS)
    assert schedules["stagevar", 1.0, 7].cfg_stop == 4 and schedules["stagevar", 1.0, 7].selector == "projection"
    assert all(schedules["random", a, b].prunes and schedules["random", a, b].skip for a in ASPECTS for b in BUDGETS)
