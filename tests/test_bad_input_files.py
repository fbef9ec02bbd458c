"""Bad input files: configs, checkpoints, `convert` and `batch` (API and CLI).

Each case of the table makes one bad input in a fresh folder, runs the call, and checks three things:
the error (its type, or exit status 2 with one `minivar: error:` line), a single-line message that
names the culprit, and that no file in the folder was created, changed or lost.
"""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY
from PIL import Image
from safetensors.torch import save_file
from test_cli import ROOT, run
from test_errors import one_line

import minivar
from minivar.cli import batch
from minivar.loading.checkpoint import load_infinity
from minivar.model.config import InfinityConfig
from minivar.loading.convert import convert
from minivar.loading.files import LOCK_FILE, FolderBusy, FolderLock
from minivar.loading.checkpoint import load_vae
from minivar.loading.weights import CheckpointError

CFG = InfinityConfig.from_upstream(TINY / "infinity_config.json")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------------------------------
# Folders of inputs
# --------------------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file under `folder`: a symlink's target, else a hash of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file (cheap enough for the large fixture files)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    data = change(data) or data
    path.unlink()  # the copy may be a symlink into the fixtures: never write through it
    path.write_text(json.dumps(data))


def model_dir(tmp: Path) -> Path:
    """A model directory: the tiny checkpoints linked, the configs (and T5's) copied so that they can be edited."""
    d = tmp / "model"
    (d / "t5").mkdir(parents=True)
    for name in ("infinity.pth", "vae.pth"):
        (d / name).symlink_to(TINY / name)
    for name in ("infinity_config.json", "vae_config.json"):
        shutil.copy(TINY / name, d / name)
    for f in (TINY / "t5").iterdir():
        if f.suffix == ".json":
            shutil.copy(f, d / "t5" / f.name)
        else:
            (d / "t5" / f.name).symlink_to(f)
    return d


def set_infinity(key: str, value) -> Callable[[dict], None]:
    def change(cfg: dict) -> None:
        for part in ("constructor_kwargs", "all_constructor_arguments"):
            cfg[part][key] = value
    return change


def set_vae(key: str, value) -> Callable[[dict], None]:
    def change(cfg: dict) -> None:  # wherever upstream's file sets it (the namespace wins over the call)
        parts = [d for d in (cfg, cfg["vae_model_call"], cfg["autoencoder_args"]) if key in d]
        for d in parts or [cfg["vae_model_call"]]:
            d[key] = value
    return change


def tiny_sd() -> dict[str, torch.Tensor]:
    return torch.load(TINY / "infinity.pth", weights_only=True)


def safetensors_with(tmp: Path, edit: Callable[[dict], None]) -> Path:
    """The tiny transformer as safetensors, with its JSON header edited (sizes kept)."""
    path = tmp / "infinity.safetensors"
    save_file(tiny_sd(), path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
    return path


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    make: Callable[[Path], object]   # builds the bad input under tmp; returns what `act` needs
    act: Callable[[object], object]  # the call: an API call, or a list of CLI arguments
    error: type | int                # the exception type, or 2: the CLI's exit status
    names: tuple[str, ...]           # what the one-line message must contain


def infinity_config_case(id_: str, change, error, *names) -> Case:
    def make(tmp: Path) -> Path:
        d = model_dir(tmp)
        edit_json(d / "infinity_config.json", change)
        return d
    return Case(id_, make, minivar.load, error, ("infinity_config.json", *names))


def vae_config_case(id_: str, change, *names) -> Case:
    def make(tmp: Path) -> Path:
        d = model_dir(tmp)
        edit_json(d / "vae_config.json", change)
        return d
    return Case(id_, make, minivar.load, ValueError, ("vae_config.json", *names))


def t5_config_case(id_: str, file: str, change, *names) -> Case:
    def make(tmp: Path) -> Path:
        d = model_dir(tmp)
        edit_json(d / "t5" / file, change)
        return d
    return Case(id_, make, minivar.load, CheckpointError, (file, *names))


def raw_file(name: str, content: bytes | str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        d = model_dir(tmp)
        (d / name).unlink()
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return d
    return make


def checkpoint_case(id_: str, make: Callable[[Path], Path], *names, load=None) -> Case:
    return Case(id_, make, load or (lambda p: load_infinity(p, CFG)), CheckpointError, names)


def saved(tmp: Path, sd: dict, name: str = "infinity.pth") -> Path:
    torch.save(sd, tmp / name)
    return tmp / name


def edited_sd(edit: Callable[[dict], None], prefix: str = "") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        sd = tiny_sd()
        edit(sd)
        return saved(tmp, {prefix + k: v for k, v in sd.items()})
    return make


def index_file(tmp: Path, content) -> Path:
    (tmp / "model.safetensors.index.json").write_text(json.dumps(content))
    return tmp / "model.safetensors.index.json"


def flat_vae_with_wrong_conv_out(tmp: Path) -> Path:
    sd = torch.load(TINY / "vae.pth", weights_only=True)["vae"]
    sd = {k.replace(".conv.", ".", 1) if k.startswith("decoder.conv_out") else k: v for k, v in sd.items()}
    sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"][:2]
    return saved(tmp, sd, "vae.pth")


LOADER_CASES = [
    infinity_config_case("infinity-depth-str", set_infinity("depth", "4"), ValueError, "depth='4'", "integer"),
    infinity_config_case("infinity-depth-null", set_infinity("depth", None), ValueError, "depth=None"),
    infinity_config_case("infinity-embed-float", set_infinity("embed_dim", 128.0), ValueError, "embed_dim=128.0"),
    infinity_config_case("infinity-heads-list", set_infinity("num_heads", [2]), ValueError, "num_heads=[2]"),
    infinity_config_case("infinity-mlp-negative", set_infinity("mlp_ratio", -4), ValueError, "mlp_ratio=-4"),
    infinity_config_case("infinity-patchify-str", set_infinity("apply_spatial_patchify", "yes"), ValueError,
                         "apply_spatial_patchify='yes'"),
    infinity_config_case("infinity-pn-unknown", set_infinity("pn", "3M"), ValueError, "pn='3M'"),
    infinity_config_case("infinity-heads-split", set_infinity("num_heads", 3), ValueError, "num_heads=3"),
    infinity_config_case("infinity-kwargs-list", lambda c: c.update(constructor_kwargs=[4]), ValueError,
                         "constructor_kwargs must be a JSON object"),
    infinity_config_case("infinity-not-object", lambda c: [1, 2], CheckpointError, "JSON array, not an object"),
    Case("infinity-null", raw_file("infinity_config.json", "null"), minivar.load, CheckpointError,
         ("infinity_config.json", "JSON null, not an object")),
    Case("infinity-invalid-json", raw_file("infinity_config.json", '{"depth": 4,'), minivar.load, CheckpointError,
         ("infinity_config.json", "not valid JSON")),
    Case("infinity-not-utf8", raw_file("infinity_config.json", b'{"depth": "\xff"}'), minivar.load, CheckpointError,
         ("infinity_config.json", "not valid JSON")),
    infinity_config_case("infinity-absurd-depth", set_infinity("depth", 10**9), CheckpointError,
                         "depth=1000000000", "GiB of weights"),
    infinity_config_case("infinity-absurd-width", set_infinity("embed_dim", 2**20), CheckpointError,
                         "embed_dim=1048576", "GiB of weights"),
    vae_config_case("vae-base-ch-str", set_vae("base_ch", "24"), "base_ch='24'"),
    vae_config_case("vae-ch-mult-str", set_vae("encoder_ch_mult", "12444"), "ch_mult='12444'"),
    vae_config_case("vae-patch-not-pow2", set_vae("patch_size", 12), "patch_size=12"),
    vae_config_case("vae-absurd-blocks", set_vae("num_res_blocks", 10**9), "num_res_blocks=1000000000"),
    vae_config_case("vae-absurd-bits", set_vae("codebook_dim", 10**9), "codebook_dim=1000000000"),
    vae_config_case("vae-call-list", lambda c: c.update(vae_model_call=[1]), "vae_model_call must be a JSON object"),
    Case("vae-not-object", raw_file("vae_config.json", '"d32"'), minivar.load, CheckpointError,
         ("vae_config.json", "JSON string, not an object")),
    t5_config_case("t5-layers-str", "config.json", lambda c: c.update(num_layers="2"), "num_layers='2'"),
    t5_config_case("t5-absurd-layers", "config.json", lambda c: c.update(num_layers=10**9), "num_layers=1000000000",
                   "GiB of weights"),
    t5_config_case("t5-ffn-int", "config.json", lambda c: c.update(feed_forward_proj=3), "feed_forward_proj 3"),
    t5_config_case("t5-not-object", "config.json", lambda c: [c], "JSON array, not an object"),
    t5_config_case("tokenizer-extra-ids-str", "tokenizer_config.json", lambda c: c.update(extra_ids="100"),
                   "extra_ids='100'"),
    checkpoint_case("st-header-wrong-dtype",
                    lambda tmp: safetensors_with(tmp, lambda h: h["block_chunks.0.module.1.ffn.fc1.weight"].update(dtype="I32")),
                    "block_chunks.0.module.1.ffn.fc1.weight (minivar: blocks.1.ffn.fc1.weight) int32 vs model float32"),
    checkpoint_case("st-header-bool", lambda tmp: safetensors_with(tmp, lambda h: h["cfg_uncond"].update(dtype="BOOL",
                    shape=[h["cfg_uncond"]["shape"][0], 4 * h["cfg_uncond"]["shape"][1]])), "cfg_uncond", "bool"),
    checkpoint_case("st-header-wrong-size", lambda tmp: safetensors_with(tmp, lambda h: h["head.weight"].update(dtype="F16")),
                    "infinity.safetensors", "damaged"),
    checkpoint_case("st-header-swapped-shape", lambda tmp: safetensors_with(
                    tmp, lambda h: h["head.weight"].update(shape=h["head.weight"]["shape"][::-1])), "head.weight", "shape"),
    checkpoint_case("st-truncated", lambda tmp: (tmp / "infinity.safetensors").write_bytes(
                    (TINY / "t5/model.safetensors").read_bytes()[:5000]) and tmp / "infinity.safetensors",
                    "infinity.safetensors", "truncated"),
    checkpoint_case("pth-tensor-not-dict", lambda tmp: saved(tmp, torch.zeros(3)), "infinity.pth", "holds a Tensor"),
    checkpoint_case("pth-value-not-tensor", edited_sd(lambda sd: sd.update({"head.weight": 3})),
                    "head.weight is a int"),
    checkpoint_case("ddp-missing-key", edited_sd(lambda sd: sd.pop("block_chunks.1.module.1.ffn.fc1.weight"), "module."),
                    "module.block_chunks.1.module.1.ffn.fc1.weight (minivar: blocks.3.ffn.fc1.weight)"),
    checkpoint_case("wrapped-and-plain-twice", lambda tmp: saved(tmp, {**tiny_sd(), "module.head.weight": tiny_sd()["head.weight"]}),
                    "head.weight and module.head.weight"),
    checkpoint_case("index-weight-map-list", lambda tmp: index_file(tmp, {"weight_map": ["a.safetensors"]}),
                    "model.safetensors.index.json", "weight_map"),
    checkpoint_case("index-shard-outside", lambda tmp: index_file(tmp, {"weight_map": {"head.weight": "../x.safetensors"}}),
                    "model.safetensors.index.json", "'../x.safetensors'"),
    checkpoint_case("index-not-object", lambda tmp: index_file(tmp, [1]), "model.safetensors.index.json", "JSON array"),
    checkpoint_case("vae-flat-key-shape", flat_vae_with_wrong_conv_out,
                    "decoder.conv_out.weight (minivar: decoder.conv_out.conv.weight)",
                    load=lambda p: load_vae(p, TINY / "vae_config.json")),
]


# --------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------
def pth_copy(tmp: Path) -> Path:
    shutil.copy(TINY / "vae.pth", tmp / "vae.pth")
    return tmp / "vae.pth"


def pth_with_symlink_twin(tmp: Path) -> Path:
    src = pth_copy(tmp)
    (tmp / "vae.safetensors").symlink_to(src)
    return src


CONVERT_CASES = [
    Case("convert-out-is-input", pth_copy, lambda src: convert(src, src), ValueError, ("is the input", "vae.pth")),
    Case("convert-out-symlink-to-input", lambda tmp: (tmp / "out.safetensors").symlink_to(pth_copy(tmp)) or tmp / "vae.pth",
         lambda src: convert(src, src.parent / "out.safetensors"), ValueError, ("out.safetensors", "is the input")),
    Case("convert-default-twin-is-input", pth_with_symlink_twin, convert, ValueError, ("vae.safetensors", "is the input")),
    Case("convert-out-wrong-ext", pth_copy, lambda src: convert(src, src.with_name("vae.bin")), ValueError,
         ("vae.bin", "must end in .safetensors")),
    Case("convert-truncated", lambda tmp: (tmp / "x.pth").write_bytes((TINY / "vae.pth").read_bytes()[:4096]) and tmp / "x.pth",
         convert, CheckpointError, ("x.pth", "truncated")),
    Case("cli-convert-out-is-input", pth_copy, lambda src: ["convert", str(src), "--out", str(src)], 2,
         ("is the input",)),
    Case("cli-convert-out-symlink", lambda tmp: (tmp / "link.pth").symlink_to(pth_copy(tmp)) or tmp / "link.pth",
         lambda src: ["convert", str(src), "--out", str(src.with_name("vae.pth"))], 2, ("is the input",)),
    Case("cli-convert-out-pth", pth_copy, lambda src: ["convert", str(src), "--out", str(src.with_name("other.pth"))],
         2, ("other.pth", "must end in .safetensors")),
]


# --------------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------------
class FakePipe:
    """Stands in for a Pipeline: an image that depends on the prompt and the seed, made at once."""

    def generate(self, text: str, seed: int, **kwargs):
        return SimpleNamespace(image=Image.new("RGB", (4, 4), (seed % 256, len(text) % 256, 0)), timings={"text": 0.0})


SETTINGS = {"model": "fake", "res": 256}


def api_batch(prompts: Path, out: Path, settings: dict = SETTINGS, seeds=(1,)) -> batch.BatchResult:
    found, _ = batch.read_prompts(prompts)
    return batch.run_batch(FakePipe, batch.make_jobs(found, list(seeds)), out, {}, settings, batch.Ranks(),
                           show_progress=False)


def finished_folder(tmp: Path, lines: str = "a cat\na dog\n") -> SimpleNamespace:
    """A batch folder with every image of `lines` done, then the prompts file rewritten."""
    (tmp / "prompts.txt").write_text(lines)
    (tmp / "out").mkdir()
    api_batch(tmp / "prompts.txt", tmp / "out")
    return SimpleNamespace(prompts=tmp / "prompts.txt", out=tmp / "out")


def edited_prompts(tmp: Path) -> SimpleNamespace:
    f = finished_folder(tmp)
    f.prompts.write_text("a cat\na red dog\n")
    return f


class HeldLock:
    """`make` for a folder whose lock this test process holds (a flock, like a running batch's)."""

    def __call__(self, tmp: Path) -> SimpleNamespace:
        f = SimpleNamespace(prompts=tmp / "prompts.txt", out=tmp / "out")
        f.prompts.write_text("a cat\na dog\n")
        f.out.mkdir()
        self.lock = FolderLock(f.out, "test").acquire()
        return f


def cli_batch(f: SimpleNamespace, *extra: str) -> list[str]:
    return ["batch", str(f.prompts), "--out", str(f.out), "--model", str(TINY), "--res", "256", *extra]


def not_utf8_prompts(tmp: Path) -> SimpleNamespace:
    f = finished_folder(tmp)
    f.prompts.write_bytes(b"a cat\n\xff\xfe oops\n")
    return f


BATCH_CASES = [
    Case("batch-prompt-edited", edited_prompts, lambda f: api_batch(f.prompts, f.out), ValueError,
         ("line(s) 2", "'a dog'", "'a red dog'")),
    Case("cli-batch-prompt-edited", edited_prompts, cli_batch, 2, ("line(s) 2", "a red dog")),
    Case("batch-other-settings", finished_folder, lambda f: api_batch(f.prompts, f.out, {**SETTINGS, "res": 512}),
         ValueError, ("res=256",)),
    Case("batch-locked", HeldLock(), lambda f: api_batch(f.prompts, f.out), FolderBusy,
         ("in use by another", f"pid {os.getpid()}")),
    Case("cli-batch-locked", HeldLock(), cli_batch, 2, ("in use by another", f"pid {os.getpid()}")),
    Case("cli-batch-not-utf8", not_utf8_prompts, cli_batch, 2, ("prompts.txt", "not UTF-8")),
    Case("cli-batch-prompts-is-folder", finished_folder, lambda f: cli_batch(SimpleNamespace(prompts=f.out, out=f.out)),
         2, ("out",)),
]


@pytest.mark.parametrize("case", LOADER_CASES + CONVERT_CASES + BATCH_CASES, ids=lambda c: c.id)
def test_bad_input_file(case: Case, tmp_path: Path, capsys):
    arg = case.make(tmp_path)
    before = snapshot(tmp_path)
    fixtures_before = stamps(TINY)
    try:
        if case.error == 2:
            code, _, err = run(case.act(arg), capsys)
            lines = [line for line in err.splitlines() if line.startswith("minivar: error:")]
            assert code == 2 and len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
            msg = lines[0]
        else:
            with pytest.raises(case.error) as err:
                case.act(arg)
            msg = one_line(err)
    finally:
        if isinstance(case.make, HeldLock):
            case.make.lock.release()
    for name in case.names:
        assert name in msg, msg
    if isinstance(case.make, HeldLock):
        before.pop(f"out/{LOCK_FILE}")  # the lock this test held
    assert snapshot(tmp_path) == before
    assert stamps(TINY) == fixtures_before


def test_the_table_is_large_enough():
    assert len(LOADER_CASES + CONVERT_CASES + BATCH_CASES) >= 35


# --------------------------------------------------------------------------------------------------
# What must go on working
# --------------------------------------------------------------------------------------------------
def test_a_line_with_an_unpaired_surrogate_is_skipped_and_the_batch_goes_on(tmp_path):
    lines = ['{"prompt": "a cat"}', '{"prompt": "bad \\udcff"}', '{"prompt": "a dog", "id": "x\\udcff"}',
             '{"prompt": "a cow", "tag": "\\ud800"}', '{"prompt": "a \\ud83d\\udc31 cat"}']  # the last: a paired emoji
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    prompts, problems = batch.read_prompts(tmp_path / "p.jsonl")
    assert [p.line for p in prompts] == [1, 5] and prompts[1].text == "a 🐱 cat"
    assert [m.split(": ")[0] for m in problems] == [f"{tmp_path / 'p.jsonl'}:{n}" for n in (2, 3, 4)]
    assert all("unpaired surrogate" in m and "line skipped" in m for m in problems)
    (tmp_path / "out").mkdir()
    result = api_batch(tmp_path / "p.jsonl", tmp_path / "out")
    assert result.generated == 2
    recs = [json.loads(x) for x in (tmp_path / "out/manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in recs] == ["a cat", "a 🐱 cat"]


def test_cli_batch_skips_a_surrogate_line_and_finishes(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "bad \\udcff", "id": "bad"}\n{"prompt": "a red apple", "id": "ok"}\n')
    code, out, err = run(["batch", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), "--model", str(TINY),
                          "--res", "256"], capsys)
    assert code == 0, err
    assert "p.jsonl:1: holds an unpaired surrogate \\udcff" in err and "1 of 1 images done" in out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["manifest.jsonl", "ok_seed1.png"]


def test_non_ascii_ids_stay_distinct(tmp_path):
    ids = ["猫", "犬", "🐱", "🐶", "café", "cafe\u0301", "a/b", "ça va?"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "id": x}) for i, x in enumerate(ids)))
    prompts, problems = batch.read_prompts(tmp_path / "p.jsonl")
    got = [p.id for p in prompts]
    # "café" composed and decomposed are one id (NFC): the second is reported as a duplicate
    assert len(problems) == 1 and ":6: duplicate id 'café'" in problems[0]
    assert got == ["猫", "犬", "u1f431", "u1f436", "café", "a_b", "ça_va_"]
    for pid in got:  # every id names a file
        (tmp_path / f"{pid}_seed1.png").write_bytes(b"")
    assert len(list(tmp_path.glob("*.png"))) == len(got)


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    f = finished_folder(tmp_path)
    take_and_die = ("import os, signal, sys\nfrom minivar.loading.files import FolderLock\n"
                    "FolderLock(sys.argv[1], 'batch').acquire()\nos.kill(os.getpid(), signal.SIGKILL)\n")
    child = subprocess.Popen([sys.executable, "-c", take_and_die, str(f.out)], env=ENV)
    assert child.wait(timeout=120) == -signal.SIGKILL
    assert (f.out / LOCK_FILE).read_text().strip() == str(child.pid)  # left behind by the killed holder
    f.prompts.write_text("a cat\na dog\na cow\n")
    result = api_batch(f.prompts, f.out)
    assert result.stale_lock_pid == child.pid and result.generated == 1
    assert not (f.out / LOCK_FILE).exists()


def test_a_second_process_holding_the_folder_stops_a_run(tmp_path):
    f = finished_folder(tmp_path)
    hold = ("import sys\nfrom minivar.loading.files import FolderLock\nFolderLock(sys.argv[1], 'batch').acquire()\n"
            "print('locked', flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(f.out)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        f.prompts.write_text("a cat\na dog\na cow\n")
        with pytest.raises(FolderBusy, match=f"pid {holder.pid}"):
            api_batch(f.prompts, f.out)
        assert not (f.out / "00002_seed1.png").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    assert api_batch(f.prompts, f.out).generated == 1  # once the holder is gone, the run goes ahead


def test_the_folder_lock_is_exclusive_and_released(tmp_path):
    with FolderLock(tmp_path, "batch"):
        with pytest.raises(FolderBusy, match="in use by another batch"):
            FolderLock(tmp_path, "batch").acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with FolderLock(tmp_path, "batch") as again:
        assert again.stale_pid is None


def test_convert_writes_atomically_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    src = pth_copy(tmp_path)
    out = convert(src)
    good = out.read_bytes()

    def full_disk(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="disk full"):
        convert(src)
    monkeypatch.undo()
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["vae.pth", "vae.safetensors"]


def test_a_write_never_goes_through_a_symlink_planted_at_a_temporary_name(tmp_path, monkeypatch):
    """Even a planted link under the exact random name the writer picks is refused (O_EXCL), not followed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    guesses = iter(["deadbeef", "0badf00d"])
    monkeypatch.setattr("secrets.token_hex", lambda n: next(guesses))
    for name in (".x.png.partial", ".x.png.deadbeef.partial"):
        (tmp_path / "out" / name).symlink_to(victim)
    batch.save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "out" / "x.png")
    assert victim.read_text() == "precious"
    assert Image.open(tmp_path / "out" / "x.png").size == (4, 4) and not (tmp_path / "out" / "x.png").is_symlink()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".x.png.deadbeef.partial", ".x.png.partial", "x.png"]


@pytest.mark.parametrize("name, act", [
    (LOCK_FILE, lambda out: FolderLock(out, "batch").acquire()),
    ("manifest.rank0.jsonl", lambda out: batch.append_record(out / "manifest.rank0.jsonl", {"file": "x.png"})),
])
def test_a_symlink_planted_where_batch_keeps_its_own_file_is_refused(name, act, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).symlink_to(victim)
    with pytest.raises(ValueError, match=f"{name} is a symbolic link where minivar keeps a file of its own; remove it"):
        act(tmp_path / "out")
    assert victim.read_text() == "precious"


def test_convert_into_a_folder_takes_the_input_name(tmp_path):
    src = pth_copy(tmp_path)
    (tmp_path / "out").mkdir()
    assert convert(src, tmp_path / "out") == tmp_path / "out" / "vae.safetensors"
