"""Resumable toy training: a run stopped and resumed ends with the weights of an uninterrupted one."""
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from safetensors.torch import load_file

from minivar.toy import train

RECIPE = replace(train.RECIPES["tiny"], vae_stage=train.Stage(steps=4, batch=2, lr=2e-3, warmup=2),
                 gpt_stage=train.Stage(steps=6, batch=2, lr=2e-3, warmup=2), coarse_batch=2)


class Killed(Exception):
    pass


def kill_before_checkpoint(monkeypatch, stage: str, step: int) -> None:
    """Stop the run after `step` of `stage` is trained and logged but before its checkpoint is due: the
    worst moment for a kill, since the log then holds a row the checkpoint does not."""
    step_done = train.Checkpoint.step_done

    def stop(self, name, i, *args, **kwargs):
        if (name, i) == (stage, step):
            raise Killed
        step_done(self, name, i, *args, **kwargs)

    monkeypatch.setattr(train.Checkpoint, "step_done", stop)


def tensors(out) -> dict[str, torch.Tensor]:
    """Every stored tensor of a model directory: transformer, VAE and T5."""
    return {**{f"infinity.{k}": v for k, v in torch.load(out / "infinity.pth", weights_only=True).items()},
            **{f"vae.{k}": v for k, v in torch.load(out / "vae.pth", weights_only=True)["vae"].items()},
            **{f"t5.{k}": v for k, v in load_file(out / "t5" / "model.safetensors").items()}}


def assert_same_weights(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def steps_logged(out) -> list[tuple[str, int]]:
    return [(r["stage"], r["step"]) for r in rows(out) if r["stage"] in ("vae", "infinity")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_thread):
    """The reference: one run without checkpoints (writing them must not change anything either)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train.run(RECIPE, out)
    return out


def test_a_run_stopped_twice_and_resumed_ends_with_the_same_weights(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:   # stopped in the VAE stage: resumes from its step 2
        kill_before_checkpoint(m, "vae", 3)
        with pytest.raises(Killed):
            train.run(RECIPE, out, checkpoint_every=2)
    assert ("vae", 3) in steps_logged(out)
    with monkeypatch.context() as m:   # resumed, then stopped in the transformer stage: resumes from its step 4
        kill_before_checkpoint(m, "infinity", 5)
        with pytest.raises(Killed):
            train.run(RECIPE, out, checkpoint_every=2, resume=True)
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 4
    seconds = train.run(RECIPE, out, checkpoint_every=2, resume=True)
    assert_same_weights(out, uninterrupted)
    assert (out / "t5" / "spiece.model").read_bytes() == (uninterrupted / "t5" / "spiece.model").read_bytes()
    # the log: every step's row once, with the uninterrupted run's values, and a row per resume
    same = [r for r in rows(out) if r["stage"] in ("vae", "infinity")]
    assert same == [r for r in rows(uninterrupted) if r["stage"] in ("vae", "infinity")]
    assert [(r["at"], r["step"]) for r in rows(out) if r["stage"] == "resumed"] == [("vae", 2), ("infinity", 4)]
    assert list(seconds) == ["tokenizer", "vae", "infinity", "total"]
    assert not (out / "resume.pt").exists() and not (out / "resume.pt.tmp").exists()


def test_a_short_run_on_a_reused_vae_resumes_too(uninterrupted, tmp_path, monkeypatch):
    """--reuse-vae: the resumed transformer stage reads the VAE copied into the out dir; the result is
    the transformer the uninterrupted full run trained on the same VAE in memory."""
    out = tmp_path / "short"
    with monkeypatch.context() as m:
        kill_before_checkpoint(m, "infinity", 3)
        with pytest.raises(Killed):
            train.run(RECIPE, out, reuse=uninterrupted, checkpoint_every=2)
    train.run(RECIPE, out, reuse=uninterrupted, checkpoint_every=2, resume=True)
    assert_same_weights(out, uninterrupted)
    assert steps_logged(out) == [("infinity", 0), ("infinity", 5)]


def test_resuming_with_other_arguments_is_refused_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        kill_before_checkpoint(m, "vae", 1)
        with pytest.raises(Killed):
            train.run(RECIPE, out, checkpoint_every=1)
    log = (out / "train_log.jsonl").read_text()
    other = replace(RECIPE, seed=1, gpt_stage=replace(RECIPE.gpt_stage, steps=9))
    with pytest.raises(ValueError, match=r"another recipe \(gpt_stage.steps 6 here 9; seed 0 here 1\)") as e:
        train.run(other, out, resume=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="written by a run without --reuse-vae") as e:
        train.run(RECIPE, out, reuse=tmp_path, resume=True)
    assert "\n" not in str(e.value)
    assert (out / "train_log.jsonl").read_text() == log and (out / "resume.pt").exists()  # nothing touched


def test_a_missing_or_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="resume.pt not found .*; start afresh with --overwrite instead of --resume") as e:
        train.run(RECIPE, tmp_path, resume=True)
    assert "\n" not in str(e.value)
    (tmp_path / "resume.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="resume.pt is not a readable checkpoint") as e:
        train.run(RECIPE, tmp_path, resume=True)
    assert "\n" not in str(e.value)
    (tmp_path / "resume.pt").unlink()
    with pytest.raises(SystemExit) as exit:
        train.main(["tiny", "--out", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "not found" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# Refused before anything in OUT is written: malformed checkpoints, missing stage files, reruns
# --------------------------------------------------------------------------------------------------
TOY_DIR = Path(train.__file__).parent / "weights"


def checkpoint(out, stage: str = "vae", recipe=RECIPE, tamper=lambda state: None) -> dict[str, bytes]:
    """OUT as a run stopped after the first step of `stage` leaves it, without training: resume.pt as
    Checkpoint.step_done writes it (an untrained VAE; the transformer stage's modules are stand-ins),
    changed by `tamper`, a log, and the tokenizer (and VAE) of the finished stages. Returns the bytes of
    every file, to compare after."""
    (out / "t5").mkdir(parents=True)
    for name in train.FINISHED[: 1 if stage == "vae" else 3]:
        shutil.copyfile(TOY_DIR / name, out / name)
    log = train.Log(out / "train_log.jsonl")
    log(stage=stage, step=0)
    modules = ({"vae": train.BSQVAE(recipe.vae)} if stage == "vae" else
               {"infinity": nn.Linear(2, 2), "t5": nn.Linear(2, 2)})
    opt = train.optimizer([p for m in modules.values() for p in m.parameters()], recipe.vae_stage)
    train.Checkpoint(out, recipe, 1, None, log).step_done(stage, 0, modules, opt, random.Random(0),
                                                          torch.Generator() if stage == "infinity" else None)
    state = torch.load(out / "resume.pt", weights_only=True)
    tamper(state)
    torch.save(state, out / "resume.pt")
    return files(out)


def files(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


MALFORMED = [  # (change to a checkpoint of the VAE stage, words of the error)
    (lambda s: s.pop("modules"), "has no 'modules' entry"),
    (lambda s: s.update(stage="bogus"), "is of stage 'bogus', not one of ['vae', 'infinity']"),
    (lambda s: s.update(step=10**9), "is at step 1000000000, outside the vae stage's 1..4"),
    (lambda s: s.update(step=-1), "is at step -1, outside the vae stage's 1..4"),
    (lambda s: s.update(step=2.0), "has a float as its 'step' entry"),
    (lambda s: s.update(log=None), "has a NoneType as its 'log' entry"),
    (lambda s: s.update(modules={"t5": {}}), "holds the modules ['t5'], the vae stage has ['vae']"),
    (lambda s: s["rng"].pop("python"), "has no 'python' random state"),
    (lambda s: s.update(seconds={"vae": "long"}), "has seconds that are not numbers"),
    # well-formed, but not this stage's state: refused when it is loaded, still before anything is written
    (lambda s: s["modules"].update(vae={"w": torch.zeros(1)}),
     "does not fit the vae stage (RuntimeError: Error(s) in loading state_dict for BSQVAE"),
    (lambda s: s["rng"].update(python=[3]), "does not fit the vae stage (ValueError"),
]


@pytest.mark.parametrize("tamper, words", MALFORMED, ids=[w.split(" (")[0] for _, w in MALFORMED])
def test_a_malformed_checkpoint_is_one_line_and_nothing_is_written(tmp_path, tamper, words):
    before = checkpoint(tmp_path, tamper=tamper)
    with pytest.raises(train.ResumeError) as e:
        train.run(RECIPE, tmp_path, checkpoint_every=1, resume=True)
    assert words in str(e.value) and "\n" not in str(e.value) and "--overwrite" in str(e.value)
    assert files(tmp_path) == before


def test_a_checkpoint_that_is_not_a_dict_is_one_line(tmp_path):
    before = checkpoint(tmp_path)
    torch.save([1, 2], tmp_path / "resume.pt")
    with pytest.raises(train.ResumeError, match="resume.pt holds a list, not a checkpoint's dict"):
        train.run(RECIPE, tmp_path, resume=True)
    assert files(tmp_path).keys() == before.keys()


def test_resuming_the_transformer_stage_without_the_vae_is_one_line(tmp_path, capsys):
    """The transformer stage resumes on OUT's vae.pth: missing or broken, it is named, and nothing is written."""
    checkpoint(tmp_path, "infinity", recipe=train.RECIPES["tiny"])
    (tmp_path / "vae.pth").unlink()
    for vae, words in [(None, "has no vae.pth; start afresh"), (b"not a checkpoint", "vae.pth is truncated")]:
        if vae is not None:
            (tmp_path / "vae.pth").write_bytes(vae)
        before = files(tmp_path)
        with pytest.raises(SystemExit) as exit:
            train.main(["tiny", "--out", str(tmp_path), "--resume", "--threads", str(torch.get_num_threads())])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err and words in err
        assert files(tmp_path) == before


def test_a_rerun_into_a_run_is_refused_unless_resume_or_overwrite(tmp_path, monkeypatch):
    before = checkpoint(tmp_path)
    with pytest.raises(train.RunError, match=r"holds an earlier run \(resume.pt, train_log.jsonl, t5\); "
                                             "continue it with --resume, or replace it with --overwrite") as e:
        train.run(RECIPE, tmp_path, checkpoint_every=1)
    assert "\n" not in str(e.value) and files(tmp_path) == before
    (tmp_path / "resume.pt").unlink()   # a completed run: only --overwrite is offered
    with pytest.raises(train.RunError, match=r"\(train_log.jsonl, t5\); replace it with --overwrite, or choose"):
        train.run(RECIPE, tmp_path)
    monkeypatch.setattr(train, "train_tokenizer", lambda *args: pytest.fail("training started"))
    with pytest.raises(pytest.fail.Exception, match="training started"):
        train.run(RECIPE, tmp_path, overwrite=True)  # starts afresh: the old log is gone
    assert not (tmp_path / "train_log.jsonl").exists()


def test_a_warm_started_run_with_every_binding_option_resumes_bit_for_bit(uninterrupted, tmp_path, monkeypatch):
    """--init, a category mix, placed scenes, directional T5 heads and the T5 role probe (whose weights and
    optimiser state the checkpoint carries) together: stopped and resumed, it ends where an uninterrupted
    run does, and it started from the --init model rather than from a fresh init."""
    recipe = replace(RECIPE, init=str(uninterrupted), mix=(1.0, 2.0, 0.0, 2.0, 2.0), placed=0.3,
                     t5_directional=4.0, t5_roles=0.5)
    whole, out = tmp_path / "whole", tmp_path / "stopped"
    train.run(recipe, whole, reuse=uninterrupted)
    with monkeypatch.context() as m:
        kill_before_checkpoint(m, "infinity", 3)
        with pytest.raises(Killed):
            train.run(recipe, out, reuse=uninterrupted, checkpoint_every=2)
    assert "roles" in torch.load(out / "resume.pt", weights_only=True)["modules"]
    train.run(recipe, out, reuse=uninterrupted, checkpoint_every=2, resume=True)
    assert_same_weights(out, whole)
    first = [r for r in rows(whole) if r["stage"] == "infinity"][0]
    fresh = [r for r in rows(uninterrupted) if r["stage"] == "infinity"][0]
    mean = lambda row: sum(row["per_scale"]) / len(row["per_scale"])  # noqa: E731  the image loss, without the probe's
    assert mean(first) < mean(fresh) and "role_loss" in first  # warm: below a fresh model's first loss


def test_init_that_does_not_fit_the_recipe_is_one_line_before_anything_is_written(uninterrupted, tmp_path):
    wider = replace(RECIPE, init=str(uninterrupted), infinity=replace(RECIPE.infinity, embed_dim=96))
    with pytest.raises(train.RunError, match=r"^--init .*drop --init$") as e:
        train.run(wider, tmp_path / "out", reuse=uninterrupted)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(train.RunError, match="has no infinity.pth"):
        train.run(replace(RECIPE, init=str(tmp_path)), tmp_path / "out", reuse=uninterrupted)
