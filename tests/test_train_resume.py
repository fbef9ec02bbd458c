"""Resumable toy training: a run stopped and resumed ends with the weights of an uninterrupted one."""
import json
from dataclasses import replace

import pytest
import torch
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
    with pytest.raises(ValueError, match="resume.pt not found .*; start without --resume") as e:
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
