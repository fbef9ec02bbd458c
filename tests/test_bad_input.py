"""Bad generation arguments, table-driven: the API (`Pipeline.generate`, `minivar.sample`), prune
schedules and the CLI. Every case must give one ValueError line naming the culprit (exit status 2 and
`minivar: error: ...` on the CLI), before any work is done and without creating a file."""
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PROMPT, SETTINGS, TINY, tiny_pipeline

import minivar
from minivar.cli import main
from minivar.pipeline import check_arguments
from minivar.model.pruning import PruneSchedule

ROOT = Path(__file__).resolve().parents[1]
N256 = 7  # scales of the 256 schedule
NAN, INF = math.nan, math.inf


def bits(*shape, dtype=torch.int64, value=None) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype) if value is None else torch.full(shape, value, dtype=dtype)


def first_scales(n: int) -> list[torch.Tensor]:
    """Zero bits of the first n scales of the 256 schedule (1x1, 2x2, 4x4, ...)."""
    sides = [1, 2, 4, 6, 8, 12, 16, 20]
    return [bits(1, s, s, 32) for s in sides[:n]]


PRUNE_BASE = {"drop": {5: 0.5}, "cache_scale": 4, "layers": (0, 3)}

# (id, keyword arguments of generate at res=256, text the message must contain)
API_CASES = [
    ("cfg-nan", dict(cfg=NAN), "cfg=nan"),
    ("cfg-inf", dict(cfg=INF), "cfg=inf"),
    ("cfg-neg-inf", dict(cfg=-INF), "cfg=-inf"),
    ("cfg-str", dict(cfg="3"), "cfg='3'"),
    ("cfg-none", dict(cfg=None), "cfg=None"),
    ("cfg-list-nan", dict(cfg=[3.0] * 6 + [NAN]), "cfg=[3.0"),
    ("cfg-list-short", dict(cfg=[3.0] * 6), "cfg has 6 per-scale values"),
    ("cfg-list-long", dict(cfg=[3.0] * 8), "cfg has 8 per-scale values"),
    ("cfg-list-empty", dict(cfg=[]), "cfg=[]"),
    ("cfg-huge", dict(cfg=1e308), "cfg=1e+308"),  # these three were NaN probabilities in torch.multinomial
    ("cfg-huge-on-hidden-states", dict(cfg=-1e30, cfg_insertion_layer=-1), "cfg=-1e+30"),
    ("tau-tiny", dict(tau=1e-300), "tau=1e-300"),
    ("tau-list-tiny", dict(tau=[0.5] * 6 + [1e-40]), "tau=[0.5"),
    ("tau-zero", dict(tau=0), "tau=0"),
    ("tau-negative", dict(tau=-1.0), "tau=-1.0"),
    ("tau-nan", dict(tau=NAN), "tau=nan"),
    ("tau-inf", dict(tau=INF), "tau=inf"),
    ("tau-bool", dict(tau=True), "tau=True"),
    ("tau-list-short", dict(tau=[0.5] * 3), "tau has 3 per-scale values"),
    ("tau-list-zero", dict(tau=[0.5] * 6 + [0.0]), "tau=[0.5"),
    ("prompt-empty", dict(prompt=""), "prompt=''"),
    ("prompt-blank", dict(prompt=" \n\t"), "prompt="),
    ("prompt-empty-in-list", dict(prompt=["a cat", ""]), "prompt[1]=''"),
    ("prompt-zero-width", dict(prompt="\u200b\u200c\u200d\u2060\ufeff"), "nothing visible"),
    ("prompt-invisible-in-list", dict(prompt=["a cat", "\u00a0\u3000\u180e\u3164\x00"]), "prompt[1]="),
    ("top_p-above-one", dict(top_p=1.5), "top_p=1.5"),
    ("top_p-negative", dict(top_p=-0.1), "top_p=-0.1"),
    ("top_p-nan", dict(top_p=NAN), "top_p=nan"),
    ("top_p-str", dict(top_p="0.9"), "top_p='0.9'"),
    ("top_k-float", dict(top_k=1.5), "top_k=1.5"),
    ("top_k-str", dict(top_k="900"), "top_k='900'"),
    ("top_k-bool", dict(top_k=True), "top_k=True"),
    ("top_k-negative", dict(top_k=-1), "top_k=-1"),
    ("seed-float", dict(seed=1.0), "seed=1.0"),
    ("seed-str", dict(seed="1"), "seed='1'"),
    ("seed-negative", dict(seed=-1), "seed=-1"),
    ("seed-2**64", dict(seed=2**64), f"seed={2**64}"),
    ("seed-2**70", dict(seed=2**70), f"seed={2**70}"),
    ("seed-bool", dict(seed=True), "seed=True"),
    ("negative_prompt-int", dict(negative_prompt=5), "negative_prompt=5"),
    ("negative_prompt-list", dict(negative_prompt=["blurry"]),
     "negative_prompt=['blurry'] is invalid: use one string (the negative prompt of every image"),
    ("negative_prompt-surrogate", dict(negative_prompt="\udcff"), "negative_prompt='\\udcff'"),
    ("progress-str", dict(progress="yes"), "progress='yes'"),
    ("progress-int", dict(progress=1), "progress=1"),
    ("prompt-int", dict(prompt=5), "prompt=5"),
    ("prompt-none", dict(prompt=None), "prompt=None"),
    ("prompt-empty-list", dict(prompt=[]), "prompt=[]"),
    ("prompt-list-with-int", dict(prompt=["a cat", 3]), "prompt[1]=3"),
    ("prompt-bytes", dict(prompt=b"a cat"), "prompt=b'a cat'"),
    ("prompt-surrogate", dict(prompt="\udcff"), "prompt='\\udcff'"),
    ("prompt-surrogate-in-list", dict(prompt=["a cat", "red \udcff"]), "prompt[1]='red \\udcff'"),
    ("prompt-too-long", dict(prompt="a" * 20_001), "prompt of 20001 characters"),
    ("force_bits-too-many", dict(force_bits=first_scales(N256) + [bits(1, 16, 16, 32)]), "force_bits=8 entries"),
    ("force_bits-tensor", dict(force_bits=bits(1, 1, 1, 32)), "force_bits=tensor of shape (1, 1, 1, 32)"),
    ("force_bits-shape", dict(force_bits=[bits(1, 2, 2, 32)]), "force_bits[0]"),
    ("force_bits-batch", dict(force_bits=[bits(2, 1, 1, 32)]), "force_bits[0]"),
    ("force_bits-depth", dict(force_bits=first_scales(1) + [bits(1, 2, 2, 31)]), "force_bits[1]"),
    ("force_bits-float", dict(force_bits=[bits(1, 1, 1, 32, dtype=torch.float32)]), "force_bits[0]"),
    ("force_bits-five", dict(force_bits=first_scales(2) + [bits(1, 4, 4, 32, value=5)]), "force_bits[2]"),
    ("force_bits-minus-one", dict(force_bits=[bits(1, 1, 1, 32, value=-1)]), "force_bits[0]"),
    ("force_bits-list-of-lists", dict(force_bits=[[[[0] * 32]]]), "force_bits[0]"),
    ("cfg_stop_scale-beyond", dict(cfg_stop_scale=N256 + 1), "cfg_stop_scale=8"),
    ("cfg_stop_scale-negative", dict(cfg_stop_scale=-1), "cfg_stop_scale=-1"),
    ("cfg_stop_scale-float", dict(cfg_stop_scale=2.5), "cfg_stop_scale=2.5"),
    ("cfg_stop_scale-str", dict(cfg_stop_scale="3"), "cfg_stop_scale='3'"),
    ("cfg_insertion_layer-deep", dict(cfg_insertion_layer=-4), "cfg_insertion_layer=-4"),
    ("cfg_insertion_layer-float", dict(cfg_insertion_layer=0.5), "cfg_insertion_layer=0.5"),
    ("prune-unknown-word", dict(prune="fast"), "prune='fast'"),
    ("prune-int", dict(prune=1), "prune=1"),
    ("prune-unknown-key", dict(prune={**PRUNE_BASE, "dorp": {5: 0.5}}), "'dorp'"),
    ("prune-drop-list", dict(prune={"drop": [0.5]}), "prune['drop']=[0.5]"),
    ("prune-drop-str", dict(prune={**PRUNE_BASE, "drop": {5: "0.5"}}), "prune drop ratio '0.5'"),
    ("prune-drop-scale-str", dict(prune={**PRUNE_BASE, "drop": {"five": 0.5}}), "scale 'five'"),
    ("prune-skip-int", dict(prune={"skip": 5}), "prune['skip']=5"),
    ("prune-skip-str", dict(prune={"skip": "56"}), "prune['skip']='56'"),
    ("prune-skip-first", dict(prune={"skip": [0]}), "skips scale 0"),  # a torch reshape error in the loop
    ("prune-layers-int", dict(prune={**PRUNE_BASE, "layers": 3}), "prune['layers']=3"),
    ("prune-layers-float", dict(prune={**PRUNE_BASE, "layers": (0.0, 3.0)}), "layer window (0.0, 3.0)"),
    ("prune-cache-str", dict(prune={**PRUNE_BASE, "cache_scale": "4"}), "cache_scale='4'"),
    ("prune-selector", dict(prune={**PRUNE_BASE, "selector": "best"}), "selector 'best'"),
    ("h_div_w-str", dict(h_div_w="1"), "h_div_w='1'"),
    ("h_div_w-nan", dict(h_div_w=NAN), "h_div_w=nan"),
    ("h_div_w-far", dict(h_div_w=10.0), "h_div_w=10.0"),
    ("h_div_w-bool", dict(h_div_w=True), "h_div_w=True"),
    ("res-unknown", dict(res=1000), "res=1000"),
    ("res-bool", dict(res=True), "res=True"),
    ("res-budget", dict(res="2M"), "res='2M'"),
    ("res-float", dict(res=1024.0), "res=1024.0"),
    ("output_type", dict(output_type="png"), "output_type='png'"),
    ("trace-str", dict(trace="yes"), "trace='yes'"),
]

# Inconsistent prune schedules (bug 3 of issue 17): (id, schedule, text the message must contain).
SCHEDULE_CASES = [
    ("cache-skipped", PruneSchedule(drop={5: 0.4}, skip=frozenset({4}), layers=(0, 3), cache_scale=4),
     "cache_scale=4 is a skipped scale"),
    ("cache-skipped-no-drop", PruneSchedule(skip=frozenset({6}), cache_scale=6), "cache_scale=6 is a skipped scale"),
    ("cache-beyond", PruneSchedule(drop={5: 0.4}, layers=(0, 3), cache_scale=7), "cache_scale=7 is out of range"),
    ("cache-negative", PruneSchedule(drop={5: 0.4}, layers=(0, 3), cache_scale=-1), "cache_scale=-1 is out of range"),
    ("cache-after-pruned", PruneSchedule(drop={5: 0.4}, layers=(0, 3), cache_scale=6), "cache scale before them"),
    ("cache-missing", PruneSchedule(drop={5: 0.4}, layers=(0, 3)), "cache_scale=None"),
    ("drop-one", PruneSchedule(drop={5: 1.0}, layers=(0, 3), cache_scale=4), "drop ratio 1.0"),
    ("drop-above-one", PruneSchedule(drop={5: 1.5}, layers=(0, 3), cache_scale=4), "drop ratio 1.5"),
    ("drop-negative", PruneSchedule(drop={5: -0.1}, layers=(0, 3), cache_scale=4), "drop ratio -0.1"),
    ("drop-nan", PruneSchedule(drop={5: NAN}, layers=(0, 3), cache_scale=4), "drop ratio nan"),
    ("drop-scale-beyond", PruneSchedule(drop={7: 0.4}, layers=(0, 3), cache_scale=4), "names scale 7"),
    ("skip-beyond", PruneSchedule(skip=frozenset({9})), "names scale 9"),
    ("skip-everything", PruneSchedule(skip=frozenset(range(N256))), "skips all 7 scales"),
    ("skip-first", PruneSchedule(skip=frozenset({0})), "skips scale 0"),
    ("skip-first-of-many", PruneSchedule(skip=frozenset({0, 5, 6})), "skips scale 0"),
    ("skip-and-drop", PruneSchedule(drop={5: 0.4}, skip=frozenset({5}), layers=(0, 3), cache_scale=4),
     "both skips and prunes scales [5]"),
    ("layers-past-depth", PruneSchedule(drop={5: 0.4}, layers=(0, 4), cache_scale=4), "layer window (0, 4)"),
    ("layers-start-past-depth", PruneSchedule(drop={5: 0.4}, layers=(4, 5), cache_scale=4), "layer window (4, 5)"),
    ("layers-negative", PruneSchedule(drop={5: 0.4}, layers=(-1, 2), cache_scale=4), "layer window (-1, 2)"),
    ("layers-reversed", PruneSchedule(drop={5: 0.4}, layers=(3, 1), cache_scale=4), "layer window (3, 1)"),
    ("layers-three", PruneSchedule(drop={5: 0.4}, layers=(0, 1, 2), cache_scale=4), "layer window (0, 1, 2)"),
    ("selector", PruneSchedule(drop={5: 0.4}, layers=(0, 3), cache_scale=4, selector="best"), "selector 'best'"),
    ("rank-zero", PruneSchedule(drop={5: 0.4}, layers=(0, 3), cache_scale=4, selector="projection", rank=0), "rank=0"),
    ("rank-float", PruneSchedule(drop={5: 0.4}, layers=(0, 3), cache_scale=4, selector="projection", rank=2.5),
     "rank=2.5"),
    ("cfg-stop-beyond", PruneSchedule(cfg_stop=8), "cfg_stop=8"),
    ("cfg-stop-negative", PruneSchedule(cfg_stop=-1), "cfg_stop=-1"),
]


def assert_one_line(message: str, culprit: str) -> None:
    assert "\n" not in message and culprit in message, message


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """Run in an empty folder and check afterwards that nothing was written there."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, culprit", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_generate_refuses(kwargs, culprit, empty_cwd):
    args = {"prompt": PROMPT, "res": 256, **SETTINGS, **kwargs}
    with pytest.raises(ValueError) as err:
        tiny_pipeline().generate(**args)
    assert_one_line(str(err.value), culprit)


@pytest.mark.parametrize("schedule, culprit", [c[1:] for c in SCHEDULE_CASES], ids=[c[0] for c in SCHEDULE_CASES])
def test_inconsistent_prune_schedule_is_refused(schedule, culprit, empty_cwd):
    with pytest.raises(ValueError) as err:
        schedule.validate(N256, 4)
    assert_one_line(str(err.value), culprit)
    with pytest.raises(ValueError) as err:  # the same line from generate, before any work
        tiny_pipeline().generate(PROMPT, res=256, prune=schedule, **SETTINGS)
    assert_one_line(str(err.value), culprit)


def test_issue_example_cache_scale_skipped_at_1024():
    """`PruneSchedule(skip={8}, cache_scale=8, ...)` raised a raw KeyError (0, 'sa') from the scale loop."""
    schedule = PruneSchedule(drop={9: 0.4, 10: 0.5}, skip=frozenset({8}), layers=(0, 3), cache_scale=8)
    with pytest.raises(ValueError, match="cache_scale=8 is a skipped scale"):
        tiny_pipeline().generate(PROMPT, res=1024, prune=schedule, output_type="latent", **SETTINGS)


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(cfg=NAN), "cfg=nan"),
    (dict(tau=-1), "tau=-1"),
    (dict(top_p=-0.1), "top_p=-0.1"),
    (dict(prompt=""), "prompt=''"),
    (dict(prompt="\u200b"), "prompt='\\u200b'"),
    (dict(seed=2**70), "seed="),
    (dict(prompt="\udcff"), "prompt="),
    (dict(prompt=["a list"]), "prompt=['a list']"),  # sample returns one image: it takes one prompt
    (dict(progress="yes"), "progress='yes'"),
    (dict(prune="fast"), "prune='fast'"),
    (dict(h_div_w="wide"), "h_div_w='wide'"),
    (dict(res=-5.0), "res=-5.0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_sample_refuses_before_loading_a_model(kwargs, culprit, empty_cwd):
    args = {"prompt": PROMPT, "model": "no-such-model", **kwargs}  # loading would fail: "unknown model"
    with pytest.raises(ValueError) as err:
        minivar.sample(**args)
    assert_one_line(str(err.value), culprit)


def test_skipping_middle_and_last_scales_is_fine():
    """Only scale 0 cannot be skipped; a scale named twice is one scale (it was counted twice)."""
    PruneSchedule(skip=[6] * N256).validate(N256, 4)
    out = tiny_pipeline().generate(PROMPT, res=256, prune={"skip": [3, 6, 6]}, output_type="latent", **SETTINGS)
    assert out.summed_codes.shape == (1, 32, 16, 16) and out.prune.skip == {3, 6}


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")

# minivar.load's arguments: (id, keyword arguments, text the message must contain). Each used to end in a
# torch error or an AssertionError; the model name would fail too, so the check must come before any reading.
LOAD_CASES = [
    pytest.param(dict(device="cuda"), "device='cuda'", id="device-cuda-absent", marks=NO_CUDA),
    pytest.param(dict(device="cuda:0"), "device='cuda:0'", id="device-cuda-0-absent", marks=NO_CUDA),
    pytest.param(dict(device="mps"), "device='mps'", id="device-mps-absent", marks=NO_MPS),
    pytest.param(dict(device="cuda:99"), "device='cuda:99'", id="device-cuda-99"),
    pytest.param(dict(device="bogus"), "device='bogus'", id="device-bogus"),
    pytest.param(dict(device="CPU"), "device='CPU'", id="device-upper-case"),
    pytest.param(dict(device="meta"), "device='meta'", id="device-meta"),
    pytest.param(dict(device=None), "device=None", id="device-none"),
    pytest.param(dict(device=0), "device=0", id="device-int"),
    pytest.param(dict(dtype="float32x"), "dtype='float32x'", id="dtype-unknown-name"),
    pytest.param(dict(dtype=torch.int8), "dtype=torch.int8", id="dtype-int8"),
    pytest.param(dict(dtype=torch.float64), "dtype=torch.float64", id="dtype-float64"),
    pytest.param(dict(dtype=torch.complex64), "dtype=torch.complex64", id="dtype-complex"),
    pytest.param(dict(dtype=np.float32), "dtype=<class 'numpy.float32'>", id="dtype-numpy"),
    pytest.param(dict(dtype=16), "dtype=16", id="dtype-int"),
    pytest.param(dict(name=3), "name=3", id="name-int"),
    pytest.param(dict(name=["toy"]), "name=['toy']", id="name-list"),
    pytest.param(dict(name=""), "name=''", id="name-empty"),
    pytest.param(dict(transformer=3), "transformer=3", id="transformer-int"),
    pytest.param(dict(config=3), "config=3", id="config-int"),
    pytest.param(dict(vae_config=True), "vae_config=True", id="vae-config-bool"),
    pytest.param(dict(revision=3), "revision=3", id="revision-int"),
]


@pytest.mark.parametrize("kwargs, culprit", LOAD_CASES)
def test_load_refuses_before_reading_a_file(kwargs, culprit, empty_cwd):
    with pytest.raises(ValueError) as err:
        minivar.load(**{"name": "no-such-model", **kwargs})
    assert_one_line(str(err.value), culprit)


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(device="bogus"), "device='bogus'"),
    (dict(dtype="bf17"), "dtype='bf17'"),
    (dict(model=3), "model=3"),
], ids=["device", "dtype", "model"])
def test_sample_checks_device_dtype_and_model_before_loading(kwargs, culprit, empty_cwd):
    with pytest.raises(ValueError) as err:
        minivar.sample(PROMPT, **{"model": "no-such-model", **kwargs})
    assert_one_line(str(err.value), culprit)


@pytest.mark.parametrize("kwargs", [dict(stepz=10), dict(output_type="latent"), dict(dtype="bf16", steps=3)],
                         ids=["typo", "output_type", "typo-after-valid"])
def test_sample_refuses_an_unknown_keyword_before_loading(kwargs, empty_cwd, monkeypatch):
    """sample used to load the model (minutes for the 2B) and only then learn of the typo from generate;
    output_type="latent" left no image to return (IndexError)."""
    from minivar import pipeline

    monkeypatch.setattr(pipeline, "cached_pipeline", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(TypeError) as err:
        minivar.sample(PROMPT, model="toy", **kwargs)
    name = next(k for k in kwargs if k != "dtype")
    assert_one_line(str(err.value), f"unexpected keyword argument {name!r}")


def test_dtype_names_map_to_torch_dtypes():
    """The CLI's names work in the API too; they used to reach torch as a device string."""
    for name, dtype in [("bf16", torch.bfloat16), ("float32", torch.float32), ("fp16", torch.float16)]:
        assert minivar.load(TINY, dtype=name).transformer.storage_dtype == dtype
    assert minivar.load(TINY, device=torch.device("cpu")).device == torch.device("cpu")


def test_batch_skips_a_prompt_line_with_nothing_visible(tmp_path):
    """It used to pass the batch's blank-line test and stop the batch half way, when generate refused it."""
    from minivar.cli.batch import read_prompts

    (tmp_path / "p.txt").write_text("a cat\n\u200b\u200b\n\u2060\ufeff \n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "\\u200d"}\n', encoding="utf-8")
    for name, skipped in (("p.txt", 2), ("p.jsonl", 1)):
        prompts, problems = read_prompts(tmp_path / name)
        assert [p.text for p in prompts] == ["a cat"] and len(problems) == skipped, problems
        assert all("nothing visible" in m and "line skipped" in m for m in problems), problems


@pytest.mark.parametrize("image, culprit", [
    (3, "image=3"), (None, "image=None"),                                   # AttributeError: no .dtype
    (np.zeros((64, 64), np.uint8), "shape (64, 64)"),                        # a torch permute error
    (torch.full((1, 3, 64, 64), NAN), "shape (1, 3, 64, 64)"),              # these three were accepted
    (torch.full((1, 3, 64, 64), 255.0), "shape (1, 3, 64, 64)"),
    (torch.zeros(1, 3, 0, 64), "shape (1, 3, 0, 64)"),
], ids=["int", "none", "gray", "nan", "0-255-floats", "empty"])
def test_encode_image_refuses(image, culprit):
    with pytest.raises(ValueError) as err:
        tiny_pipeline().encode_image(image, res=256, h_div_w=1.0)
    assert_one_line(str(err.value), culprit)


def test_h_div_w_accepts_any_real_number():
    for h_div_w in [np.float64(1.0), np.int64(1), np.float16(2), Fraction(1, 2)]:
        check_arguments(h_div_w=h_div_w)
        assert minivar.scale_schedule(256, h_div_w) == minivar.scale_schedule(256, float(h_div_w)), h_div_w
    out = tiny_pipeline().generate(PROMPT, res=256, h_div_w=np.float32(0.5), output_type="latent", **SETTINGS)
    assert out.scales == minivar.scale_schedule(256, 0.5)


def test_numpy_integers_are_integers():
    kw = {**SETTINGS, "top_k": np.int64(900), "seed": np.uint64(1)}
    a = tiny_pipeline().generate(PROMPT, res=256, output_type="latent", cfg_stop_scale=np.int64(3), **kw)
    b = tiny_pipeline().generate(PROMPT, res=256, output_type="latent", cfg_stop_scale=3, **SETTINGS)
    assert torch.equal(a.summed_codes, b.summed_codes)


# --------------------------------------------------------------------------------------------------
# The CLI: the same checks, before the model loads, and no --out written
# --------------------------------------------------------------------------------------------------
CLI_CASES = [
    ("cfg-nan", ["--cfg", "nan"], "cfg=nan"),
    ("cfg-inf", ["--cfg", "inf"], "cfg=inf"),
    ("tau-negative", ["--tau", "-1"], "tau=-1.0"),
    ("tau-zero", ["--tau", "0"], "tau=0.0"),
    ("tau-nan", ["--tau", "nan"], "tau=nan"),
    ("top-p-negative", ["--top-p", "-0.1"], "top_p=-0.1"),
    ("top-p-above-one", ["--top-p", "1.5"], "top_p=1.5"),
    ("top-p-nan", ["--top-p", "nan"], "top_p=nan"),
    ("top-k-negative", ["--top-k", "-1"], "top_k=-1"),
    ("seed-negative", ["--seed", "-1"], "seed=-1"),
    ("seed-2**70", ["--seed", str(2**70)], f"seed={2**70}"),
    ("negative-prompt-undecodable", ["--negative-prompt", os.fsdecode(b"blurry \xff")], "negative_prompt="),
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("minivar: error:")]
    assert len(lines) == 1 and "Traceback" not in err and err.strip().splitlines()[-1] == lines[0], err
    return code, lines[0]


@pytest.mark.parametrize("flags, culprit", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses(flags, culprit, tmp_path, capsys):
    out = tmp_path / "x.png"
    code, line = run_cli(["a cat", "--model", str(TINY), "--out", str(out), *flags], capsys)
    assert code == 2 and culprit in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prompt", ["", "   "])
def test_cli_refuses_an_empty_prompt(prompt, tmp_path, capsys):
    code, line = run_cli([prompt, "--model", str(TINY), "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "prompt=" in line and "empty" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, culprit", [(["--cfg", "nan"], "cfg=nan"), (["--tau", "0"], "tau=0.0"),
                                            (["--top-p", "2"], "top_p=2.0"), (["--seeds", "1,-2"], "--seeds=-2"),
                                            (["--seeds", str(2**70)], f"--seeds={2**70}")],
                         ids=["cfg", "tau", "top-p", "negative-seed", "huge-seed"])
def test_cli_batch_refuses_before_creating_the_folder(flags, culprit, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    code, line = run_cli(["batch", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "o"),
                          "--model", str(TINY), *flags], capsys)
    assert code == 2 and culprit in line
    assert [p.name for p in tmp_path.iterdir()] == ["prompts.txt"]


def test_cli_undecodable_prompt_in_argv(tmp_path):
    """Invalid UTF-8 bytes in argv (the shell's $'red \\xff') reach Python as a lone surrogate."""
    out = tmp_path / "x.png"
    cmd = [sys.executable.encode(), b"-m", b"minivar", b"red \xff", b"--model", bytes(TINY), b"--out", bytes(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, timeout=300, env=env)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["minivar: error: prompt='red \\udcff' is invalid: it is not valid Unicode "
                                        "text (character 4 cannot be encoded as UTF-8); pass UTF-8 text"]
    assert list(tmp_path.iterdir()) == []


def test_cli_res_message_names_what_the_user_passed(tmp_path, capsys):
    """The toy's 4-pixel tokens: --res 1024 used to be reported as "res=4096"."""
    code, line = run_cli(["a cat", "--model", "toy", "--res", "1024", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "res=1024 " in line and "4096" not in line and "64" in line
    assert list(tmp_path.iterdir()) == []
