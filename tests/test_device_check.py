"""`python -m minivar.bench.device_check --dry-run`: the GPU check's code, run on the CPU with tiny models,
so that it works the day a GPU is lent. One arm is made to fail: the report must still be written."""
import json

import pytest

from minivar.bench import device_check
from minivar.pipeline import Pipeline


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    generate = Pipeline.generate

    def failing_stagevar(self, *args, **kw):  # as an out-of-memory error in one arm would
        if kw.get("prune") == "stagevar":
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return generate(self, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Pipeline, "generate", failing_stagevar)
        device_check.main(["--dry-run", "--out", str(out)])
    return json.loads((out / "device_check.json").read_text()), (out / "device_check.md").read_text()


def test_every_arm_is_timed_or_reports_its_error(dry_run):
    report, _ = dry_run
    assert report["dry_run"] and [a["label"] for a in report["arms"]] == \
        ["1024 prune=off", "1024 prune=on", "1024 prune=stagevar", "2048 prune=on"]
    ok = [a for a in report["arms"] if a["prune"] != "stagevar"]
    assert all(a["error"] is None and a["time"]["total"]["median"] > 0 for a in ok)
    assert set(ok[0]["time"]) == {"text", "transformer", "vae", "total"}
    assert ok[1]["speedup"]["total"] > 0 and ok[0]["speedup"]["total"] == 1.0
    failed = report["arms"][2]
    assert failed["error"] == "RuntimeError: CUDA out of memory (simulated)" and "Traceback" in failed["traceback"]


def test_the_cuda_tests_ran_and_skipped_without_cuda(dry_run):
    report, markdown = dry_run
    tests = report["tests"]
    assert tests["returncode"] == 0 and len(tests["results"]) >= 5
    assert {r["outcome"] for r in tests["results"]} == {"skipped"}
    assert "| tests.test_cuda::test_cuda_generator_is_seeded_and_reproducible | skipped | needs CUDA |" in markdown


def test_the_markdown_has_the_table_and_the_fastvar_anchors(dry_run):
    _, markdown = dry_run
    assert markdown.startswith("# Device check (dry run)")
    assert "| 1024 prune=on (as budget 0.25M) |" in markdown and "| 2.7x, 11.9 GB |" in markdown
    assert "| 1024 prune=stagevar (as budget 0.25M) | RuntimeError: CUDA out of memory (simulated) |" in markdown
    assert "16.1 -> 11.9 GB" in markdown


def test_without_cuda_the_real_check_refuses_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(device_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here; run with --dry-run"):
        device_check.main(["--out", str(tmp_path)])


def test_a_subject_that_cannot_be_built_fails_every_arm_and_the_report_is_written(tmp_path, monkeypatch):
    def no_memory(*args, **kw):
        raise MemoryError("cannot allocate 8 GiB")
    monkeypatch.setattr(device_check, "random_subject", no_memory)
    monkeypatch.setattr(device_check, "run_tests", lambda out, dry_run: {"skipped": "pytest is not installed"})
    report = device_check.main(["--dry-run", "--out", str(tmp_path)])
    assert {a["error"] for a in report["arms"]} == {"MemoryError: cannot allocate 8 GiB"}
    markdown = (tmp_path / "device_check.md").read_text()
    assert "Subject: not built (MemoryError: cannot allocate 8 GiB)." in markdown
    assert markdown.rstrip().endswith("Not run: pytest is not installed")
