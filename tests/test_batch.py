"""Batch generation: prompt files, sharding, atomic files and the manifest; resuming after a real SIGKILL;
and a real 2-process torchrun (gloo) run that must equal a single-process run image for image.

Every generating run is a subprocess with OMP_NUM_THREADS=1: the VAE's convolutions round differently
with different thread counts, so runs are compared at the same number of threads per process.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from minivar.cli import batch
from minivar.cli.batch import Job, Prompt, make_jobs, parse_seeds, read_prompts, shard

PROMPTS = '{"prompt": "a red apple", "id": "apple"}\n{"prompt": "a blue car"\n\n{"prompt": "a green tree"}\n'
JOBS = {"apple_seed0.png", "apple_seed1.png", "00003_seed0.png", "00003_seed1.png"}
ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, *, launcher: list[str] | None = None, script: str | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, *(launcher or []), *(["-c", script] if script else ["-m", "minivar"]), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def batch_args(tiny_dir: Path, out: str) -> list[str]:
    return ["batch", "prompts.jsonl", "--out", out, "--seeds", "0,1", "--model", str(tiny_dir), "--res", "256"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("batch")
    (d / "prompts.jsonl").write_text(PROMPTS)
    return d


@pytest.fixture(scope="module")
def reference(work: Path, tiny_dir: Path) -> Path:
    """An uninterrupted single-process run."""
    r = run_cli(batch_args(tiny_dir, "single"), work)
    assert r.returncode == 0, r.stderr
    return work / "single"


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------
def test_single_process_batch_writes_every_image_and_a_manifest(reference, work):
    assert {p.name for p in reference.glob("*.png")} == JOBS
    assert not list(reference.glob(".*")) and not list(reference.glob("manifest.rank*"))
    recs = manifest(reference)
    assert [r["file"] for r in recs] == ["apple_seed0.png", "apple_seed1.png", "00003_seed0.png", "00003_seed1.png"]
    assert recs[2]["prompt"] == "a green tree" and recs[2]["line"] == 4 and recs[3]["seed"] == 1
    assert recs[0]["settings"]["res"] == 256 and recs[0]["settings"]["prune"] is True
    assert set(recs[0]["timings"]) == {"text", "transformer", "vae", "total"}
    assert Image.open(reference / "apple_seed0.png").size == (256, 256)
    assert not np.array_equal(pixels(reference / "apple_seed0.png"), pixels(reference / "apple_seed1.png"))


def test_a_malformed_line_is_reported_with_its_number_and_the_rest_continues(reference, work, tiny_dir):
    r = run_cli(batch_args(tiny_dir, "single"), work)  # everything is done: nothing is generated again
    assert r.returncode == 0
    warnings = [line for line in r.stderr.splitlines() if line.startswith("minivar: warning:")]
    assert len(warnings) == 1 and "prompts.jsonl:2: not valid JSON" in warnings[0]
    assert "Traceback" not in r.stderr
    assert "4 of 4 images done" in r.stdout and "generated 0, found 4 finished" in r.stdout
    assert "loaded" not in r.stderr  # with nothing to do, the model is not even loaded


KILL_ON_SECOND_RECORD = textwrap.dedent("""
    import os, signal, sys
    import minivar.cli.batch as b
    from minivar.cli import main

    calls = []
    real_append = b.append_record

    def append_then_die(part, record):
        calls.append(record["file"])
        if len(calls) == 2:  # the second image: its temporary is written, its record half written
            with open(part, "ab") as f:
                f.write(b'{"id": "apple", "prompt": "a red')
            os.kill(os.getpid(), signal.SIGKILL)
        real_append(part, record)

    b.append_record = append_then_die
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_sigkill_keeps_finished_images_and_completes(reference, work, tiny_dir):
    out = work / "killed"
    r = run_cli(batch_args(tiny_dir, "killed"), work, script=KILL_ON_SECOND_RECORD)
    assert r.returncode == -signal.SIGKILL
    assert {p.name for p in out.glob("*.png")} == {"apple_seed0.png"}  # only the finished image is visible
    assert len(list(out.glob(".apple_seed1.png.*.partial"))) == 1  # the killed write, never renamed
    assert not (out / "manifest.jsonl").exists()
    first = (out / "apple_seed0.png").stat()

    r = run_cli(batch_args(tiny_dir, "killed"), work)
    assert r.returncode == 0, r.stderr
    assert "generated 3, found 1 finished" in r.stdout
    again = (out / "apple_seed0.png").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # skipped, not rewritten
    assert {p.name for p in out.iterdir()} == JOBS | {"manifest.jsonl"}  # no partials, no part files
    recs = manifest(out)
    assert sorted(r["file"] for r in recs) == sorted(JOBS)  # complete, no duplicates, torn line ignored
    for name in JOBS:
        assert np.array_equal(pixels(out / name), pixels(reference / name)), name


def test_two_process_torchrun_equals_a_single_process_run(reference, work, tiny_dir):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = run_cli(batch_args(tiny_dir, "ranks"), work, launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    out = work / "ranks"
    recs = manifest(out)
    assert sorted(r["file"] for r in recs) == sorted(JOBS)
    assert {r["file"]: r["rank"] for r in recs} == {  # jobs r, r + 2, ... went to rank r
        "apple_seed0.png": 0, "apple_seed1.png": 1, "00003_seed0.png": 0, "00003_seed1.png": 1}
    assert {p.name for p in out.iterdir()} == JOBS | {"manifest.jsonl"}
    for name in JOBS:
        assert np.array_equal(pixels(out / name), pixels(reference / name)), name
    assert [r["file"] for r in recs] == [r["file"] for r in manifest(reference)]


@pytest.mark.parametrize("flags, setting", [(["--cfg", "4"], "cfg=3.0, not 4.0"),
                                           (["--revision", "v2"], "revision=None, not 'v2'")])
def test_rerun_with_other_pixel_settings_is_refused(flags, setting, reference, work, tiny_dir):
    r = run_cli(batch_args(tiny_dir, "single") + flags, work)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"minivar: error: single holds images made with {setting}; "
        "rerun with the same settings to resume, or use another --out"]


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------
def test_read_prompts_plain_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n{not json, just text}\n")
    prompts, problems = read_prompts(tmp_path / "p.txt")
    assert [(p.id, p.text, p.line) for p in prompts] == [
        ("00000", "a cat", 1), ("00002", "a dog", 3), ("00003", "{not json, just text}", 4)]
    assert problems == []
    lines = ['{"prompt": "x", "id": "a/b c", "tag": "two_object"}', '{"prompt": "y", "id": "a/b c"}', '[1, 2]',
             '{"prompt": ""}', '{"prompt": "z", "id": 7}', '{"prompt": "w", "id": ".."}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    prompts, problems = read_prompts(tmp_path / "p.jsonl")
    assert [(p.id, p.text, p.meta) for p in prompts] == [("a_b_c", "x", {"tag": "two_object"}), ("7", "z", {})]
    assert [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in problems] == ["2", "3", "4", "6"]
    assert "duplicate id 'a_b_c' (first on line 1)" in problems[0]


def test_shards_are_disjoint_and_complete():
    jobs = make_jobs([Prompt(f"{i:05d}", f"p{i}", i + 1) for i in range(7)], [0, 1, 2])
    for world in (1, 2, 3, 5):
        shards = [shard(jobs, r, world) for r in range(world)]
        flat = [j for s in shards for j in s]
        assert sorted(flat, key=jobs.index) == jobs and len(set(flat)) == len(jobs)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_parse_seeds():
    assert parse_seeds("0,1, 2,3") == [0, 1, 2, 3]
    for bad in ("a,b", "", "1,1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_a_failed_write_leaves_neither_the_image_nor_a_temporary(tmp_path):
    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        batch.save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "x.png", before_rename=fail)
    assert list(tmp_path.iterdir()) == []


def test_merge_keeps_one_record_per_existing_image_in_job_order(tmp_path):
    jobs = [Job(Prompt("a", "a", 1), 0), Job(Prompt("b", "b", 2), 0), Job(Prompt("c", "c", 3), 0)]
    for j in jobs[:2]:
        Image.new("RGB", (2, 2)).save(tmp_path / j.file)
    batch.append_record(tmp_path / "manifest.rank1.jsonl", {"file": "b_seed0.png", "v": 1})
    with open(tmp_path / "manifest.rank1.jsonl", "a") as f:
        f.write('{"file": "torn')  # a kill in the middle of a line
    batch.append_record(tmp_path / "manifest.rank1.jsonl", {"file": "b_seed0.png", "v": 2})
    batch.append_record(tmp_path / "manifest.rank0.jsonl", {"file": "a_seed0.png", "v": 1})
    batch.append_record(tmp_path / "manifest.rank0.jsonl", {"file": "c_seed0.png", "v": 1})  # image never renamed
    assert batch.merge_manifest(tmp_path, jobs) == 2
    assert [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()] == [
        {"file": "a_seed0.png", "v": 1}, {"file": "b_seed0.png", "v": 2}]
    assert not list(tmp_path.glob("manifest.rank*"))


# --------------------------------------------------------------------------------------------------
# Ranks, simulated as threads of this process
# --------------------------------------------------------------------------------------------------
class FakePipe:
    def generate(self, text: str, seed: int, **kwargs):
        if "broken" in text:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        return SimpleNamespace(image=Image.new("RGB", (4, 4), (seed, len(text), 0)), timings={"text": 0.0})


class ThreadRanks(batch.Ranks):
    """Rank `rank` of `world` threads: the collectives (the lock vote, the final barrier) meet at `meet`."""

    def __init__(self, rank: int, world: int, meet: threading.Barrier):
        super().__init__(rank, world)
        self.meet = meet

    def all_true(self, ok: bool) -> bool:
        self.meet.wait()
        return ok

    def barrier(self) -> None:
        self.meet.wait()


def run_ranks(tmp_path: Path, prompts: str, settings: dict) -> list:
    """Run every rank of a 2-rank batch at once; each rank's result or exception."""
    (tmp_path / "p.txt").write_text(prompts)
    jobs = make_jobs(read_prompts(tmp_path / "p.txt")[0], [1])
    (tmp_path / "out").mkdir(exist_ok=True)
    meet, results = threading.Barrier(2, timeout=120), [None, None]

    def rank(r: int) -> None:
        try:
            results[r] = batch.run_batch(FakePipe, jobs, tmp_path / "out", {}, settings, ThreadRanks(r, 2, meet),
                                         show_progress=False)
        except Exception as e:
            results[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return results


def test_a_failing_rank_stops_the_others_with_one_clear_line(tmp_path, monkeypatch):
    """Rank 1 fails on its first image; rank 0 must not wait for it at the end (a real dist.barrier waits
    out its 24-hour timeout, here the threads' barrier its 120 s) but stop, saying why."""
    monkeypatch.setattr(batch, "POLL_SECONDS", 0.01, raising=False)
    first, second = run_ranks(tmp_path, "a cat\na broken dog\na cow\n", {"model": "fake"})
    assert isinstance(second, RuntimeError)  # the failing rank's own error
    assert type(first).__name__ == "RankFailed", repr(first)
    assert str(first) == ("rank 1 of 2 failed (CUDA out of memory. Tried to allocate 2 GiB), so rank 0 stops too; "
                          "finished images are kept: rerun the same command to resume")
    assert (tmp_path / "out" / "00000_seed1.png").exists()  # rank 0's finished image is kept
    assert not (tmp_path / "out" / "00001_seed1.png").exists()


def test_ranks_meet_at_the_end_and_leave_no_markers(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "POLL_SECONDS", 0.01)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".minivar.rank1.failed").write_text("an earlier run's failure")  # cleared by the new run
    first, second = run_ranks(tmp_path, "a cat\na dog\na cow\n", {"model": "fake"})
    assert (first.generated, first.manifest_records, second.generated) == (2, 3, 1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00000_seed1.png", "00001_seed1.png", "00002_seed1.png", "manifest.jsonl"]


@pytest.mark.parametrize("key, other", [("device", "cuda"), ("revision", "abc123")])
def test_a_rerun_on_another_device_or_revision_is_refused(key, other, tmp_path):
    """CPU and CUDA draw other random numbers, and another revision holds other weights: images made so
    must not be mixed into one folder."""
    (tmp_path / "p.txt").write_text("a cat\n")
    jobs, out = make_jobs(read_prompts(tmp_path / "p.txt")[0], [1]), tmp_path / "out"
    out.mkdir()
    settings = {"model": "fake", "res": 256, "device": "cpu", "revision": None}
    batch.run_batch(FakePipe, jobs, out, {}, settings, batch.Ranks(), show_progress=False)
    with pytest.raises(ValueError, match=f"holds images made with {key}={settings[key]!r}, not {other!r}"):
        batch.run_batch(FakePipe, jobs, out, {}, {**settings, key: other}, batch.Ranks(), show_progress=False)
