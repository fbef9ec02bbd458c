"""A full-size random checkpoint set, and the end-to-end measurement of Infinity-2B on it.

    python -m minivar.bench --subjects infinity-2b-synthetic --out docs/bench/2b-synthetic

`write_set` writes, once, random weights with the exact keys, shapes, dtypes, file formats and folder
layout of the published Infinity-2B (bf16 `.pth`), its d32 VAE (float32 `.pth`, `{"vae": ...}`) and the
flan-t5-xl encoder (float32 safetensors shards with an index), about 10 GB, in `infinity-2b-synthetic/`
under the weights home (`$MINIVAR_HOME`, default ~/.cache/minivar). That folder is a weights home of its
own, so `minivar.load("infinity-2b")` finds the set there (with MINIVAR_HOME pointing at it) exactly as it
would find downloaded weights, and never mistakes it for the real ones. Writing streams the values chunk
by chunk: a `.pth` is first saved with its data left out (`torch.serialization.skip_data`), then filled
through a shared memory map; safetensors shards are written tensor by tensor.

`run_arm` is one measured run in a fresh process (so peaks of different runs never mix): it does what
`minivar.sample` does, `minivar.load` with the defaults and then `generate`, timing each phase and
reading the kernel's peak resident set (VmHWM, mapped file pages included) per phase.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
NAME = "infinity-2b-synthetic"
SEED = 2026
CHUNK = 1 << 24                       # values generated at a time: 64 MiB of float32
T5_SHARDS = 2                         # as google/flan-t5-xl ships its weights
GiB = 2**30


# --------------------------------------------------------------------------------------------------
# Values: seeded per tensor, scaled so that a forward pass stays finite
# --------------------------------------------------------------------------------------------------
def keys(listing: str) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) from a reference listing in tests/fixtures (see its KEYS.md)."""
    return {k: tuple(v) for k, v in json.loads((FIXTURES / listing).read_text())["keys"].items()}


def fill(t: torch.Tensor, name: str, index: int) -> None:
    """Norm weights 1, biases and `zero_k_bias` 0, integer masks as BSQ builds them, the rest N(0, 0.02)."""
    from .bsq import make_mask

    if not t.is_floating_point():
        t.copy_(make_mask(t.shape[0]))
        return
    last = name.rsplit(".", 2)
    if t.ndim == 1 and last[-1] == "weight" and "norm" in name:
        t.fill_(1.0)
    elif t.ndim == 1 or "zero_k_bias" in name or "scale_mul" in name:
        t.zero_()
    else:
        gen = torch.Generator().manual_seed(SEED * 100_003 + index)
        flat = t.view(-1)
        for i in range(0, flat.numel(), CHUNK):
            n = min(CHUNK, flat.numel() - i)
            flat[i : i + n] = torch.randn(n, generator=gen).mul_(0.02)


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------
def write_pth(path: Path, listing: dict, dtype: torch.dtype, nest: str | None = None) -> None:
    """A torch.save zip with `listing`'s tensors, floating ones in `dtype`, written without holding them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .memory import drop_pages, mapping_of

    with FakeTensorMode():  # shapes and dtypes only: nothing is allocated
        sd = {k: torch.empty(shape, dtype=dtype if dt.startswith("float") else getattr(torch, dt))
              for k, (shape, dt) in listing.items()}
    tmp = path.with_name(f".{path.name}.partial")
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save({nest: sd} if nest else sd, tmp)
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)  # writes go to the file
    try:
        mapped = torch.load(tmp, mmap=True, weights_only=True)
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    written = 0
    for i, (k, t) in enumerate((mapped[nest] if nest else mapped).items()):
        fill(t, k, i)
        written += t.nbytes
        if written > GiB:  # the filled pages are in the page cache: the process need not keep them
            drop_pages(mapping_of(t))
            written = 0
    del mapped
    os.replace(tmp, path)


def write_safetensors_shards(folder: Path, listing: dict, shards: int) -> None:
    """float32 safetensors shards of about equal size plus `model.safetensors.index.json`."""
    import struct

    from .convert import SAFETENSORS_DTYPES

    names, total = list(listing), sum(4 * _numel(s) for s, _ in listing.values())
    groups, size, cut = [[]], 0, total / shards
    for k in names:
        if size >= cut * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(k)
        size += 4 * _numel(listing[k][0])
    weight_map = {}
    for si, group in enumerate(groups):
        fname = f"model-{si + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {}, 0
        for k in group:
            n = 4 * _numel(listing[k][0])
            header[k] = {"dtype": SAFETENSORS_DTYPES[torch.float32], "shape": listing[k][0],
                         "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[k] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        tmp = folder / f".{fname}.partial"
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for k in group:
                t = torch.empty(listing[k][0], dtype=torch.float32)
                fill(t, k, names.index(k))
                f.write(t.view(-1).view(torch.uint8).numpy())
        os.replace(tmp, folder / fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------------------------------
# The set: a weights home laid out as hub.py expects
# --------------------------------------------------------------------------------------------------
def set_home() -> Path:
    """The synthetic set's own weights home, inside the user's: <weights home>/infinity-2b-synthetic."""
    from .hub import weights_home

    return weights_home() / NAME


def parts(home: Path) -> dict[str, Path]:
    from .hub import SPECS

    spec = SPECS["infinity-2b"]
    return {"transformer": home / spec.name / spec.transformer, "vae": home / spec.name / spec.vae,
            "t5": home / spec.text_encoder}


def write_set(home: Path | None = None) -> Path:
    """Write the set unless a finished one is there (its manifest is written last); returns its home."""
    home = Path(home or set_home())
    manifest = home / "SYNTHETIC.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("seed") == SEED:
        return home
    p, t0 = parts(home), time.perf_counter()
    for folder in (p["transformer"].parent, p["t5"]):
        folder.mkdir(parents=True, exist_ok=True)
    print(f"writing a random Infinity-2B set (about 10 GB) into {home} ...", flush=True)
    write_pth(p["transformer"], keys("infinity_2b_keys.json"), torch.bfloat16)  # published in bf16
    write_pth(p["vae"], keys("vae_d32_keys.json"), torch.float32, nest="vae")
    t5 = {k: v for k, v in keys("flan_t5_xl_encoder_keys.json").items() if k != "encoder.embed_tokens.weight"}
    write_safetensors_shards(p["t5"], t5, T5_SHARDS)  # the files hold the tied embedding once, as shared.weight
    config = json.loads((FIXTURES / "flan_t5_xl_encoder_keys.json").read_text())["config"]
    (p["t5"] / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(FIXTURES / "tiny-a" / "t5" / "spiece.model", p["t5"] / "spiece.model")
    sizes = {str(f.relative_to(home)): f.stat().st_size for f in sorted(home.rglob("*")) if f.is_file()}
    manifest.write_text(json.dumps({"seed": SEED, "bytes": sizes, "seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {sum(sizes.values()) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    return home


# --------------------------------------------------------------------------------------------------
# One measured run, in its own process
# --------------------------------------------------------------------------------------------------
def peak_rss() -> int:
    """The kernel's high-water mark of this process's resident set (anonymous and file pages), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    """Start a new high-water mark (writing 5 to clear_refs, Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def run_arm(res: int, prune: bool, prompt: str, threads: int) -> dict:
    """`minivar.sample(prompt, res, prune)` on the set, split into load and generate so that each phase is
    timed (`Output.timings`) and gets its own peak RSS. Call it in a fresh process with MINIVAR_HOME
    pointing at the set."""
    import minivar

    torch.set_num_threads(threads)
    peaks, now = {}, {}

    def phase_end(name: str) -> None:
        peaks[name], now[name] = peak_rss(), rss()
        reset_peak()

    reset_peak()
    t0 = time.perf_counter()
    pipe = minivar.load("infinity-2b")  # what minivar.sample does, with its defaults
    load_s = time.perf_counter() - t0
    phase_end("load")
    decode = pipe.decode

    def starting_loop(ran):  # generate's progress hook, called as the scale loop starts: text is done
        phase_end("text")
        return ran

    def decoding(summed):
        phase_end("transformer")
        return decode(summed)

    pipe.decode = decoding
    out = pipe.generate(prompt, res=res, prune=prune, progress=starting_loop)
    phase_end("vae")
    dtypes = {name: str(next(m.parameters()).dtype).removeprefix("torch.")
              for name, m in (("transformer", pipe.transformer), ("t5", pipe.text_encoder), ("vae", pipe.vae))}
    return {"label": f"{NAME} {res} prune={'on' if prune else 'off'}", "res": res, "prune": prune,
            "load_s": load_s, "timings": out.timings, "peak_bytes": peaks, "rss_after": now,
            "peak_whole_run": max(peaks.values()), "dtypes": dtypes, "threads": threads,
            "image_size": list(out.image.size), "loadavg": os.getloadavg()}


def measure(res: int, prune: bool, prompt: str, threads: int, home: Path) -> dict:
    """`run_arm` in a child process (its own peak), with MINIVAR_HOME set to the synthetic home."""
    env = {**os.environ, "MINIVAR_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "minivar.synthetic", str(res), "on" if prune else "off", prompt, str(threads)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {res} prune={prune} run failed (exit code {done.returncode}); its error is above")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


if __name__ == "__main__":
    res, prune, prompt, threads = sys.argv[1:5]
    print(json.dumps(run_arm(int(res), prune == "on", prompt, int(threads))), flush=True)


# --------------------------------------------------------------------------------------------------
# The benchmark subject: every arm in its own process, results merged into OUT/synthetic.{json,md}
# --------------------------------------------------------------------------------------------------
def bench(res_list: list[int], prunes: list[bool], prompt: str, threads: int, out: Path) -> dict:
    """Write (or reuse) the set, then measure each res x prune arm; arms already in OUT with other
    labels are kept, so arms can be run one command at a time into one folder."""
    home = write_set()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "synthetic.json"
    report = json.loads(path.read_text()) if path.is_file() else {"arms": []}
    report.update(prompt=prompt, home=str(home), set_bytes=json.loads((home / "SYNTHETIC.json").read_text())["bytes"],
                  machine=machine())
    for res in res_list:
        for prune in prunes:
            print(f"{NAME} {res} prune={'on' if prune else 'off'}: running in a fresh process ...", flush=True)
            arm = measure(res, prune, prompt, threads, home)
            report["arms"] = [a for a in report["arms"] if a["label"] != arm["label"]] + [arm]
            path.write_text(json.dumps(report, indent=1))
            (out / "synthetic.md").write_text(markdown(report))
            print(arm_line(arm), flush=True)
    print(markdown(report))
    return report


def machine() -> dict:
    import platform

    return {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "torch": torch.__version__, "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def arm_line(a: dict) -> str:
    t, p = a["timings"], a["peak_bytes"]
    return (f"| {a['label']} | {a['load_s']:.1f} | {t['text']:.1f} | {t['transformer']:.1f} | {t['vae']:.1f} | "
            f"{p['load'] / GiB:.2f} | {p['text'] / GiB:.2f} | {p['transformer'] / GiB:.2f} | {p['vae'] / GiB:.2f} | "
            f"**{a['peak_whole_run'] / GiB:.2f}** | {a['loadavg'][0]:.1f} |")


def markdown(report: dict) -> str:
    size = sum(report["set_bytes"].values()) / 1e9
    lines = [f"Full-size random Infinity-2B set ({size:.2f} GB on disk: bf16 transformer, float32 VAE and "
             f"flan-t5-xl encoder), `minivar.load(\"infinity-2b\")` with the defaults, then `generate` "
             f"(what `minivar.sample` does), CFG 3, prompt {report['prompt']!r}; each arm in a fresh process. "
             "Peak RSS is the kernel's high-water mark (VmHWM: anonymous and mapped file pages), reset at "
             "each phase boundary. Times in seconds, memory in GiB.", "",
             "| arm | load s | text s | transformer s | VAE s | peak load | peak text | peak transformer | "
             "peak VAE | peak whole run | load avg |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + [arm_line(a) for a in report["arms"]]) + "\n"
