"""The command line on the tiny fixture model: end to end (console entry point), seeds, timings, the
trace file, `convert`, and one clear line (no traceback, exit status 2) for each kind of bad input."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minivar
from minivar.cli import main, parse_aspect, reserve_out

ROOT = Path(__file__).resolve().parents[1]


def test_generate_end_to_end_as_a_module(tmp_path, tiny_dir):
    out, trace = tmp_path / "fox.png", tmp_path / "trace.pt"
    cmd = [sys.executable, "-m", "minivar", "a red fox in snow", "--model", str(tiny_dir), "--res", "256",
           "--aspect", "16:9", "--seed", "1", "--out", str(out), "--trace", str(trace)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    # 16:9 is h/w 0.5625; the nearest template is 0.571 (7:4), whose 256-budget grid is 12 x 21 tokens
    assert "nearest trained template h/w 0.571 (about 7:4)" in r.stderr
    assert Image.open(out).size == (21 * 16, 12 * 16)
    assert "scales:" in r.stderr  # the progress bar over scales
    assert "per scale (grid seconds): 1x1 " in r.stdout and "12x21 " in r.stdout
    for part in ("scales total", "text encode", "transformer", "VAE decode", "total"):
        assert part in r.stdout
    saved = torch.load(trace, weights_only=True)
    assert [tuple(s) for s in saved["scales"]][-1] == (12, 21) and saved["bits"][-1].shape[1:3] == (12, 21)


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_same_seed_same_image_and_the_cli_mirrors_the_api(tmp_path, tiny_dir, capsys):
    common = ["a blue car", "--model", str(tiny_dir), "--res", "256", "--no-prune", "--cfg", "2.5", "--tau", "0.7"]
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for p in paths:
        code, out, err = run(common + ["--seed", "7", "--out", str(p)], capsys)
        assert code == 0, err
    a, b = (np.asarray(Image.open(p)) for p in paths)
    assert a.shape == (256, 256, 3) and np.array_equal(a, b)
    api = minivar.load(tiny_dir).generate("a blue car", res=256, prune=False, cfg=2.5, tau=0.7, seed=7).image
    assert np.array_equal(np.asarray(api), a)


def test_bf16_storage_on_cpu(tmp_path, tiny_dir, capsys):
    code, _, err = run(["a cat", "--model", str(tiny_dir), "--res", "256", "--dtype", "bf16",
                        "--out", str(tmp_path / "cat.png")], capsys)
    assert code == 0 and "on cpu (bf16)" in err and Image.open(tmp_path / "cat.png").size == (256, 256)


@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
def test_the_cli_says_which_numerics_ran(numerics, tmp_path, tiny_dir, capsys):
    code, _, err = run(["a cat", "--model", str(tiny_dir), "--res", "256", "--numerics", numerics,
                        "--out", str(tmp_path / "cat.png")], capsys)
    assert code == 0 and f"numerics {numerics} (asked for)" in err


def test_default_out_is_named_after_the_prompt_and_seed(tmp_path):
    assert reserve_out("A Cat, on a mat!", 1, tmp_path) == tmp_path / "a-cat-on-a-mat-seed1.png"
    assert reserve_out("一只猫", 7, tmp_path) == tmp_path / "minivar-seed7.png"


def test_two_runs_started_together_take_two_names(tmp_path):
    """Each run takes its name when it starts (an empty placeholder, created exclusively), so a second run
    that starts before the first has written its image picks the next name instead of replacing it."""
    first, second = reserve_out("a cat", 1, tmp_path), reserve_out("a cat", 1, tmp_path)
    assert (first.name, second.name) == ("a-cat-seed1.png", "a-cat-seed1-2.png")
    assert first.is_file() and second.is_file()


def test_a_failed_run_gives_its_reserved_name_back(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["a cat", "--model", str(tmp_path / "no-model")], capsys)  # fails when loading
    assert code == 2 and "no-model" in err
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_without_out_never_replaces_an_earlier_image(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["a blue car", "--model", str(tiny_dir), "--res", "256"]
    for seed in ("1", "2", "1"):
        code, _, err = run(common + ["--seed", seed], capsys)
        assert code == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a-blue-car-seed1-2.png", "a-blue-car-seed1.png", "a-blue-car-seed2.png"]
    first, again, other = (np.asarray(Image.open(tmp_path / n)) for n in
                           ("a-blue-car-seed1.png", "a-blue-car-seed1-2.png", "a-blue-car-seed2.png"))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_convert_command_writes_safetensors_next_to_the_checkpoints(tmp_path, tiny_dir, capsys):
    for name in ("infinity.pth", "vae.pth"):
        (tmp_path / name).symlink_to(tiny_dir / name)
    code, out, err = run(["convert", str(tmp_path), "--dtype", "bf16"], capsys)
    assert code == 0, err
    assert (tmp_path / "infinity.safetensors").is_file() and (tmp_path / "vae.safetensors").is_file()
    assert out.count("-> ") == 2 and "bf16" in out


@pytest.mark.parametrize("args, message", [
    (["a cat", "--model", "infinity-3b"], "unknown model 'infinity-3b'"),
    (["a cat", "--aspect", "0:1"], "--aspect '0:1': give width:height with two positive numbers"),
    (["a cat", "--aspect", "wide"], "--aspect 'wide'"),
    (["a cat", "--aspect", "5:1"], "outside the trained templates"),
    (["a cat", "--out", "{tmp}/no/such/folder/x.png"], "cannot write --out"),
    (["a cat", "--out", "{tmp}/file.txt/x.png"], "cannot write --out"),
    (["a cat", "--out", "{tmp}/x.unknownext"], "unknown image type"),
    (["a cat", "--out", "{tmp}/x.png", "--trace", "{tmp}/no/x.pt", "--model", "{tiny}", "--res", "256"], "--trace"),
    (["a cat", "--out", "{tmp}/x.png", "--trace", "{tmp}/x.png", "--model", "{tiny}", "--res", "256"],
     "would overwrite the image"),
    (["a cat", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["a cat", "--res", "300"], "argument --res: invalid choice: 300"),
    (["a cat", "--seed", "one"], "argument --seed: invalid int value: 'one'"),
    (["a cat", "--numerics", "fast"], "argument --numerics: invalid choice: 'fast'"),
    ([], "the following arguments are required: prompt"),
    (["batch", "{tmp}/missing.jsonl", "--out", "{tmp}/o", "--model", "{tiny}"], "No such file or directory"),
    (["batch", "{tmp}/file.txt", "--out", "{tmp}/file.txt/o", "--model", "{tiny}"], "file.txt"),
    (["batch", "{tmp}/file.txt", "--out", "{tmp}/o", "--seeds", "0,x", "--model", "{tiny}"], "--seeds"),
    (["convert", "{tmp}/file.txt"], "not a .pth checkpoint"),
    (["convert", "no-such-thing"], "nothing to convert"),
    (["download", "infinity-3b"], "unknown preset 'infinity-3b'"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path, tiny_dir, capsys):
    (tmp_path / "file.txt").write_text("a cat\n")
    args = [a.format(tmp=tmp_path, tiny=tiny_dir) for a in args]
    code, out, err = run(args, capsys)
    lines = [line for line in err.splitlines() if line.startswith("minivar: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == lines[0]


@pytest.mark.parametrize("flags", [["--trace", "{tmp}"], ["--out", "{tmp}/d.png"]])
def test_a_folder_as_out_or_trace_is_refused_before_generating(flags, tmp_path, tiny_dir, capsys):
    (tmp_path / "d.png").mkdir()
    args = ["a cat", "--model", str(tiny_dir), "--res", "256", "--out", str(tmp_path / "x.png")]
    code, _, err = run(args + [f.format(tmp=tmp_path) for f in flags], capsys)
    assert code == 2 and "is a folder; give a file name" in err.strip().splitlines()[-1], err
    assert "loaded" not in err and not (tmp_path / "x.png").exists()


def test_no_output_follows_a_symlink_planted_at_a_temporary_name(tmp_path, tiny_dir, capsys, monkeypatch):
    """Someone who can create files in the output folder plants links at the hidden names the image, the
    trace and `convert` were once written through: every write still lands in its own new file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    outputs = ["fox.png", "trace.pt", "a-cat-seed1.png", "vae.safetensors"]
    for name in outputs:
        (out / f".{name}.partial").symlink_to(victim)
    monkeypatch.chdir(out)
    common = ["a cat", "--model", str(tiny_dir), "--res", "256"]
    assert run(common + ["--out", "fox.png", "--trace", "trace.pt"], capsys)[0] == 0
    assert run(common, capsys)[0] == 0  # the default name
    shutil.copy(tiny_dir / "vae.pth", out / "vae.pth")
    assert run(["convert", "vae.pth"], capsys)[0] == 0
    assert victim.read_text() == "precious"
    for name in outputs:
        assert (out / name).is_file() and not (out / name).is_symlink(), name
        assert (out / f".{name}.partial").is_symlink()  # left alone
    assert Image.open(out / "fox.png").size == (256, 256) and torch.load(out / "trace.pt", weights_only=True)["scales"]


def test_missing_weights_offline_is_one_line_pointing_at_the_toy_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIVAR_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["a cat", "--out", str(tmp_path / "x.png")], capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("minivar: error: infinity-2b needs files that are not on disk")
    assert "--model toy" in line and str(tmp_path / "infinity-2b") in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_refused_before_loading(capsys):
    code, _, err = run(["a cat", "--device", "cuda", "--model", "infinity-8b"], capsys)
    assert code == 2 and "--device cuda: not available" in err


def test_aspect_is_width_to_height():
    assert parse_aspect("16:9") == 9 / 16 and parse_aspect("1:2") == 2.0 and parse_aspect(" 4 : 3 ") == 0.75


def test_debug_mode_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("MINIVAR_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown model"):
        main(["a cat", "--model", "infinity-3b"])
