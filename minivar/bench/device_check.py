"""The check to run the day a GPU is lent: the CUDA tests, then Infinity-2B-shape timings, in 8 minutes.

    python -m minivar.bench.device_check --out DIR            # on a CUDA machine
    python -m minivar.bench.device_check --dry-run --out DIR  # the same code on the CPU, tiny models, seconds

1. Tests: `pytest -m cuda` in a child process (tests/test_cuda.py: generation inside SDPA's flash and
   memory-efficient kernels only, the seeded CUDA generator, "bf16" logits against the CPU float32
   reference, a batch against single runs), read back per test from its JUnit XML.
2. Timings: Infinity-2B's shape with random weights (bf16, depth 32) and the real-size d32 VAE decoder,
   in the numerics `minivar.load` picks for the device ("bf16" on CUDA, numerics.py), at 1024 unpruned,
   prune=True and prune="stagevar", and at 2048 with prune=True; fixed random T5-width features stand
   in for T5 (`run.RandomText`), so the text phase and T5's memory are not the real ones. Per arm: a
   warm-up run, then timed runs of `Pipeline.generate` with their phase split (`Output.timings`, which
   waits for the device at every phase boundary) and the peak of `torch.cuda.max_memory_allocated`
   over the timed runs, beside FastVAR's published figures for Infinity-2B.

The machine may be bare (no flash-attn, no network): every part and every arm catches its own
exception, and the report (DIR/device_check.json and DIR/device_check.md) is written whatever fails.
--dry-run runs the same code on the CPU with tiny random models at small budgets, one run per arm (the
tests skip without CUDA), so the check cannot rot before a GPU comes; tests/test_device_check.py runs it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import torch

from .. import numerics
from ..model.config import PRESETS, budget_for_res
from ..model.vae import VAE_PRESETS, VAEConfig
from ..pipeline import GiB
from .run import ARM_WORDS, PHASES, PROMPT, Subject, machine_info, random_subject, release_memory, stats, to_device
from .synthetic import PACKAGE_PARENT as REPO  # in a checkout, the repository with its tests folder

ARMS = [(1024, False), (1024, True), (1024, "stagevar"), (2048, True)]
DRY_RES = {1024: 512, 2048: 768}     # --dry-run: the arms' budgets (as Infinity's sides) on the tiny models
BUDGET_S = 420                       # no arm starts later than this (the check must end within 8 minutes)
TESTS_TIMEOUT_S = 240
FASTVAR = {"source": "FastVAR (arXiv 2503.23367), Infinity-2B at 1024x1024",
           "speedup": 2.7, "memory_gb": {"off": 16.1, "on": 11.9}}


# --------------------------------------------------------------------------------------------------
# The machine, and the CUDA tests in a child process
# --------------------------------------------------------------------------------------------------
def machine_facts(device: torch.device) -> dict:
    info = {**machine_info(), "python": sys.version.split()[0], "device": str(device),
            "flash_attn": importlib.util.find_spec("flash_attn") is not None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                          "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                          "math": torch.backends.cuda.math_sdp_enabled()})
    return info


def run_tests(out: Path, dry_run: bool) -> dict:
    """`pytest -m cuda` over the tests folder (--dry-run: tests/test_cuda.py alone, to stay quick)."""
    target = REPO / "tests" / ("test_cuda.py" if dry_run else "")
    if not target.exists():
        return {"skipped": f"{target} does not exist (an installed copy without the repository's tests)"}
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed"}
    xml = out / "cuda_tests.xml"
    cmd = ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={xml}", str(target)]
    result, t0 = {"command": " ".join(["python", *cmd])}, time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True,
                              timeout=TESTS_TIMEOUT_S, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return {**result, "error": f"timed out after {TESTS_TIMEOUT_S} s", "results": []}
    return {**result, "returncode": done.returncode, "seconds": time.perf_counter() - t0,
            "results": junit_results(xml) if xml.is_file() else [], "output_tail": (done.stdout + done.stderr)[-3000:]}


def junit_results(path: Path) -> list[dict]:
    """[{test, outcome (passed, failed, error, skipped), message}] from pytest's JUnit XML."""
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, word in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            if (found := case.find(tag)) is not None:
                outcome, message = word, (found.get("message") or "").strip()[:400]
        results.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    return results


# --------------------------------------------------------------------------------------------------
# The timed subject and its arms
# --------------------------------------------------------------------------------------------------
def subject(device: torch.device, dry_run: bool) -> tuple[Subject, str]:
    """Infinity-2B's shape at full depth (or, for --dry-run, a tiny one) in the numerics `minivar.load`
    picks for `device` ("auto": bf16 on CUDA), and its description."""
    full, (mode, why) = PRESETS["infinity-2b"], numerics.resolve("auto", device)
    if dry_run:
        cfg = replace(full, depth=2, embed_dim=128, num_heads=2, text_channels=128)
        vae = VAEConfig(codebook_dim=32, base_ch=24, num_res_blocks=1, ch_mult=(1, 2, 4), patch_size=4)
        text = "tiny random models: depth 2, width 128; a VAE of 4-pixel cells and base width 24"
    else:
        cfg, vae = full, VAE_PRESETS["d32"]
        text = ("Infinity-2B shape: random bf16 weights, depth 32, width 2048; the real-size d32 VAE decoder "
                "(random); random T5-width text features instead of T5 (32 tokens)")
    subj = random_subject("infinity-2b-shape", "infinity-2b", cfg, cfg.depth, vae, text_tokens=32,
                          weight_dtype=torch.bfloat16, numerics=mode)
    return subj, f"{text}; numerics {mode!r} ({why})"


def new_arm(res: int, prune, dry_run: bool) -> dict:
    """An arm of ARMS: its label, and the pixel budget it runs at (a budget fits any model's token size)."""
    return {"label": f"{res} prune={ARM_WORDS.get(prune, prune)}", "prune": prune, "error": None,
            "budget": budget_for_res(DRY_RES[res] if dry_run else res)}


def time_arm(subj: Subject, budget: str, prune, warmup: int, repeats: int) -> dict:
    """`warmup` untimed, then `repeats` timed `Pipeline.generate` calls: phase times and the device's peak."""
    device, kw = subj.device, dict(res=budget, prune=prune, seed=1)
    for _ in range(warmup):
        subj.pipe.generate(PROMPT, **kw)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(repeats):
        release_memory()
        timings = subj.pipe.generate(PROMPT, **kw).timings
        runs.append({**timings, "total": sum(timings[ph] for ph in PHASES)})
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"runs": runs, "time": {k: stats([r[k] for r in runs]) for k in (*PHASES, "total")}, "peak_bytes": peak}


def run_arms(subj: Subject, dry_run: bool, repeats: int, deadline: float) -> list[dict]:
    warmup, repeats = (0, 1) if dry_run else (1, repeats)
    arms = []
    for res, prune in ARMS:
        arm = new_arm(res, prune, dry_run)
        if time.perf_counter() > deadline:
            arm["error"] = f"skipped: the check's {BUDGET_S} s budget was spent"
        else:
            arm.update(caught(lambda: time_arm(subj, arm["budget"], prune, warmup, repeats)))
        arms.append(arm)
        print(arm_row(arm, dry_run), flush=True)
        if subj.device.type == "cuda":
            torch.cuda.empty_cache()
    return arms


def caught(fn) -> dict:
    """fn()'s dict, or {"error": its one-line message, "traceback": ...} if it raised."""
    try:
        return fn()
    except Exception as e:  # a bare machine may lack anything: report it and go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                "traceback": traceback.format_exc()[-3000:]}


def compare_with_fastvar(arms: list[dict]) -> None:
    """Speed-up (total and transformer) and memory ratio of each arm against the unpruned arm at its resolution."""
    base = {a["budget"]: a for a in arms if a["prune"] is False and not a["error"]}
    for a in arms:
        b = base.get(a["budget"])
        if a["error"] or b is None:
            continue
        a["speedup"] = {k: b["time"][k]["median"] / a["time"][k]["median"] for k in ("total", "transformer")}
        a["memory_ratio"] = a["peak_bytes"] / b["peak_bytes"] if a["peak_bytes"] and b["peak_bytes"] else None


# --------------------------------------------------------------------------------------------------
# The whole check, and its report
# --------------------------------------------------------------------------------------------------
def run_check(out: Path, dry_run: bool, repeats: int) -> dict:
    start = time.perf_counter()
    device = torch.device("cpu" if dry_run else "cuda")
    report = {"dry_run": dry_run, "machine": caught(lambda: machine_facts(device)), "anchors": FASTVAR}
    print("running the CUDA tests (pytest -m cuda) ...", flush=True)
    report["tests"] = caught(lambda: run_tests(out, dry_run))
    print("building the timed subject ...", flush=True)
    built = caught(lambda: build(device, dry_run))
    report["subject"] = built.get("text") or f"not built ({built['error']})"
    if "error" in built:
        report["arms"] = [{**new_arm(r, p, dry_run), **built} for r, p in ARMS]
    else:
        report["arms"] = run_arms(built["subject"], dry_run, repeats, start + BUDGET_S)
    compare_with_fastvar(report["arms"])
    report["seconds"] = time.perf_counter() - start
    return report


def build(device: torch.device, dry_run: bool) -> dict:
    subj, text = subject(device, dry_run)
    to_device(subj, device)
    return {"subject": subj, "text": text}


def as_gib(n: int | None) -> str:
    return f"{n / GiB:.2f}" if n else "-"


def arm_row(a: dict, dry_run: bool = False) -> str:
    label = f"{a['label']} (as budget {a['budget']})" if dry_run else a["label"]
    if a["error"]:
        return "| " + " | ".join([label, a["error"].replace("|", "/"), *[""] * 6]) + " |"
    t, up = a["time"], a.get("speedup")
    speed = f"{up['total']:.2f}x / {up['transformer']:.2f}x" if up else "-"
    anchor = {"1024 prune=off": f"1.0x, {FASTVAR['memory_gb']['off']} GB",
              "1024 prune=on": f"{FASTVAR['speedup']}x, {FASTVAR['memory_gb']['on']} GB"}.get(a["label"], "-")
    cells = [label, *(f"{t[k]['median']:.3f}" for k in (*PHASES, "total")), speed, as_gib(a["peak_bytes"]), anchor]
    return "| " + " | ".join(cells) + " |"


def report_markdown(report: dict) -> str:
    m, arms = report["machine"], report["arms"]
    where = m.get("gpu") or f"CPU ({m.get('cpu', '?')})"
    runs = len(next((a["runs"] for a in arms if "runs" in a), []))
    lines = [f"# Device check{' (dry run)' if report['dry_run'] else ''}: {where}", "",
             f"torch {m.get('torch')}, CUDA {m.get('cuda', '-')}, flash-attn {'yes' if m.get('flash_attn') else 'no'}; "
             f"{report['seconds']:.0f} s in all.", "",
             f"Subject: {report['subject']}.", "",
             f"## Timings: median of {runs} run(s), seconds", "",
             "| arm | text | transformer | VAE | total | speed-up vs off (total / transformer) | peak GiB | "
             "FastVAR paper |", "|---|---|---|---|---|---|---|---|",
             *(arm_row(a, report["dry_run"]) for a in arms), "",
             f"FastVAR anchors: {FASTVAR['source']}: {FASTVAR['speedup']}x faster with pruning, memory "
             f"{FASTVAR['memory_gb']['off']} -> {FASTVAR['memory_gb']['on']} GB. Our peak is "
             "`torch.cuda.max_memory_allocated` without T5 (random text features stand in): compare the ratio "
             "of pruned to unpruned, not the gigabytes.", "",
             "## CUDA tests (`pytest -m cuda`)", ""]
    return "\n".join(lines + cuda_test_lines(report["tests"]) + [""])


def cuda_test_lines(tests: dict) -> list[str]:
    if "results" not in tests:
        return [f"Not run: {tests.get('skipped') or tests.get('error')}"]
    status = tests.get("error") or f"exit status {tests['returncode']}"
    return [f"`{tests['command']}`: {status}", "", "| test | outcome | message |", "|---|---|---|",
            *(f"| {r['test']} | {r['outcome']} | {r['message'].replace('|', '/')[:200]} |" for r in tests["results"])]


def write_report(report: dict, out: Path) -> None:
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "device_check.md").write_text(report_markdown(report))
    print(report_markdown(report))
    print(f"wrote {out / 'device_check.json'} and device_check.md")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m minivar.bench.device_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for device_check.json and device_check.md")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny models (seconds)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per arm, after one warm-up run")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats} is invalid: use 1 or more")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file: give a folder for device_check.json and device_check.md")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("minivar: error: no CUDA device here; run with --dry-run to check the code path on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.dry_run:  # tiny ops: a second thread mostly waits, and on a busy machine much longer than the op
        torch.set_num_threads(1)
    try:
        report = run_check(args.out, args.dry_run, args.repeats)
    finally:
        torch.set_num_threads(threads)
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
