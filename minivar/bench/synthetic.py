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

`measure` is one measured run: exactly the call a user makes, `minivar.sample(prompt, res, prune,
model="infinity-2b")` with every other default, in a fresh child process. Its peak is the child's
ru_maxrss as the parent reads it (the kernel's high-water mark, mapped file pages included: what the
machine must hold); inside, a thread samples /proc/self/status every 20 ms and says which phase
(load, text, transformer, VAE) holds the peak, and how much of it is anonymous and file-backed.

The keys, shapes and dtypes come from minivar's own modules, built on the meta device (tests/test_keys.py,
test_vae.py and test_text.py check them against listings of the published files), and the tokenizer is
the shipped toy's: everything comes from inside the package, so the subject runs from any install. Uses
model/vae.py (the BSQ mask buffer), loading/convert.py (safetensors dtype names) and loading/files.py
(atomic writes); run.py hands it the synthetic subject.
"""
from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..loading.files import atomic_write, write_text
from ..loading.hub import SHIPPED
from ..model.t5 import T5_PRESETS
from ..pipeline import GiB

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder `import minivar` found this minivar in
NAME = "infinity-2b-synthetic"
SEED = 2026
CHUNK = 1 << 24                       # values generated at a time: 64 MiB of float32
T5_SHARDS = 2                         # as google/flan-t5-xl ships its weights


# --------------------------------------------------------------------------------------------------
# Values: seeded per tensor, scaled so that a forward pass stays finite
# --------------------------------------------------------------------------------------------------
def keys(module: torch.nn.Module) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) of a module's state dict."""
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}


def published_keys() -> dict[str, dict[str, tuple[list[int], str]]]:
    """The keys of the published Infinity-2B, d32 VAE and flan-t5-xl encoder files: minivar's modules on
    the meta device (nothing is allocated), the transformer's blocks grouped into chunks as upstream saves them."""
    from ..model.config import PRESETS
    from ..model.t5 import T5Encoder
    from ..model.transformer import Infinity
    from ..model.vae import VAE_PRESETS, BSQVAE
    from ..toy.train import chunked_block_keys

    cfg = PRESETS["infinity-2b"]
    with torch.device("meta"):
        infinity, vae, t5 = Infinity(cfg), BSQVAE(VAE_PRESETS["d32"]), T5Encoder(T5_PRESETS["flan-t5-xl"])
    return {"transformer": chunked_block_keys(keys(infinity), cfg.block_chunks), "vae": keys(vae), "t5": keys(t5)}


def fill(t: torch.Tensor, name: str, index: int) -> None:
    """Norm weights 1, biases and `zero_k_bias` 0, integer masks as BSQ builds them, the rest N(0, 0.02)."""
    from ..model.vae import make_mask

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

    from ..pipeline import drop_pages, mapping_of

    with FakeTensorMode():  # shapes and dtypes only: nothing is allocated
        sd = {k: torch.empty(shape, dtype=dtype if dt.startswith("float") else getattr(torch, dt))
              for k, (shape, dt) in listing.items()}
    def write(f) -> None:
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save({nest: sd} if nest else sd, f)
        f.flush()
        torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)  # writes go to the file
        try:
            # the temporary just written, through its open descriptor (it has no name anyone else can swap)
            mapped = torch.load(f"/proc/self/fd/{f.fileno()}", mmap=True, weights_only=True)
        finally:
            torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
        written = 0
        for i, (k, t) in enumerate((mapped[nest] if nest else mapped).items()):
            fill(t, k, i)
            written += t.nbytes
            if written > GiB:  # the filled pages are in the page cache: the process need not keep them
                drop_pages(mapping_of(t))
                written = 0

    atomic_write(path, write)


def write_safetensors_shards(folder: Path, listing: dict, shards: int) -> None:
    """float32 safetensors shards of about equal size plus `model.safetensors.index.json`."""
    import struct

    from ..loading.convert import SAFETENSORS_DTYPES

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

        def write(f, group=group, blob=blob) -> None:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for k in group:
                t = torch.empty(listing[k][0], dtype=torch.float32)
                fill(t, k, names.index(k))
                f.write(t.view(-1).view(torch.uint8).numpy())

        atomic_write(folder / fname, write)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=1))


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
    from ..loading.hub import weights_home

    return weights_home() / NAME


def parts(home: Path) -> dict[str, Path]:
    from ..loading.hub import SPECS

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
    listings = published_keys()
    write_pth(p["transformer"], listings["transformer"], torch.bfloat16)  # published in bf16
    write_pth(p["vae"], listings["vae"], torch.float32, nest="vae")
    t5 = {k: v for k, v in listings["t5"].items() if k != "encoder.embed_tokens.weight"}
    write_safetensors_shards(p["t5"], t5, T5_SHARDS)  # the files hold the tied embedding once, as shared.weight
    write_text(p["t5"] / "config.json", json.dumps({"model_type": "t5", **asdict(T5_PRESETS["flan-t5-xl"])}, indent=1))
    atomic_write(p["t5"] / "spiece.model", lambda f: f.write((SHIPPED["toy"] / "t5" / "spiece.model").read_bytes()))
    sizes = {str(f.relative_to(home)): f.stat().st_size for f in sorted(home.rglob("*")) if f.is_file()}
    write_text(manifest, json.dumps({"seed": SEED, "bytes": sizes, "seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {sum(sizes.values()) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    return home


# --------------------------------------------------------------------------------------------------
# One measured run: exactly the call a user makes, in a fresh process
# --------------------------------------------------------------------------------------------------
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
SAMPLE_PHASES = ("load", "text", "transformer", "vae")


def status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process from /proc/self/status, bytes."""
    with open("/proc/self/status") as f:
        rows = (line.split() for line in f)
        return {r[0][:-1]: int(r[1]) * 1024 for r in rows if r and r[0][:-1] in STATUS_FIELDS}


class Sampler:
    """Reads /proc/self/status every `every` seconds on a thread, tagging each reading with the phase
    the call is in (`watch_phases` marks the boundaries), and keeps each phase's reading with the
    largest VmRSS, with the anonymous and file-backed parts of it, and when each phase began."""

    def __init__(self, every: float = 0.02):
        self.every, self.phase, self.peaks, self.began = every, "import", {}, {"import": time.perf_counter()}
        self.stop, self.thread = threading.Event(), threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.read()

    def read(self) -> None:
        now, phase = status(), self.phase
        if now["VmRSS"] > self.peaks.get(phase, {}).get("VmRSS", -1):
            self.peaks[phase] = now

    def enter(self, phase: str) -> None:
        self.read()  # the last reading of the phase before
        self.phase, self.began[phase] = phase, time.perf_counter()

    def seconds(self, end: float) -> dict[str, float]:
        starts = sorted(self.began.items(), key=lambda kv: kv[1]) + [("end", end)]
        return {name: b - a for (name, a), (_, b) in zip(starts, starts[1:])}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.read()


def watch_phases(sampler: Sampler) -> None:
    """Mark the phases of a `sample` call for the sampler, without changing what runs: load, text
    (tokenizer and T5), transformer (the scale loop), vae (decoding)."""
    from .. import pipeline

    def marking(phase, fn):
        def marked(*args, **kw):
            sampler.enter(phase)
            return fn(*args, **kw)
        return marked

    pipeline.load = marking("load", pipeline.load)
    pipeline.Pipeline.text_rows = marking("text", pipeline.Pipeline.text_rows)
    pipeline.run_scale_loop = marking("transformer", pipeline.run_scale_loop)
    pipeline.Pipeline.decode = marking("vae", pipeline.Pipeline.decode)


def run_sample(res: int, prune: bool, prompt: str, model: str = "infinity-2b") -> dict:
    """`minivar.sample(prompt, res=res, prune=prune, model=model)` with every other default, as a user
    calls it; /proc/self/status is sampled every 20 ms from before `import minivar` to the end.
    Run it in a fresh process (`measure`), so that nothing else shares its peak."""
    with Sampler() as sampler:
        import minivar

        watch_phases(sampler)
        image = minivar.sample(prompt, res=res, prune=prune, model=model)
    peak_phase = max(sampler.peaks, key=lambda k: sampler.peaks[k]["VmRSS"])
    return {"label": f"{model} {res} prune={'on' if prune else 'off'}", "res": res, "prune": prune,
            "seconds": sampler.seconds(time.perf_counter()), "peaks": sampler.peaks, "peak_phase": peak_phase,
            "image_size": list(image.size), "threads": torch.get_num_threads(), "loadavg": os.getloadavg()}


def measure(res: int, prune: bool, prompt: str, home: Path | None, model: str = "infinity-2b") -> dict:
    """`run_sample` in a child process (MINIVAR_HOME at `home` when given). The peak a user meets is
    the child's ru_maxrss as its parent reads it (os.wait4: the kernel's high-water mark of its
    resident set, mapped file pages included), which this adds as `ru_maxrss`."""
    path = os.pathsep.join([str(PACKAGE_PARENT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **({"MINIVAR_HOME": str(home)} if home else {})}
    cmd = [sys.executable, "-m", "minivar.bench.synthetic", str(res), "on" if prune else "off", prompt, model]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)  # the child imports this minivar
    out = child.stdout.read()
    _, wait_status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(wait_status) != 0:
        raise RuntimeError(f"the {res} prune={prune} run failed (exit status {os.waitstatus_to_exitcode(wait_status)}); "
                           "its error is above")
    result = json.loads(out.strip().splitlines()[-1])
    result["ru_maxrss"] = usage.ru_maxrss * 1024  # KiB on Linux
    return result


if __name__ == "__main__":
    res, prune, prompt, model = sys.argv[1:5]
    print(json.dumps(run_sample(int(res), prune == "on", prompt, model)), flush=True)


# --------------------------------------------------------------------------------------------------
# The benchmark subject: every arm in its own process, results merged into OUT/synthetic.{json,md}
# --------------------------------------------------------------------------------------------------
def bench(res_list: list[int], prunes: list[bool], prompt: str, out: Path) -> dict:
    """Write (or reuse) the set, then measure each res x prune arm (`measure`); arms already in OUT with
    other labels are kept, so arms can be run one command at a time into one folder."""
    home = write_set()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "synthetic.json"
    report = json.loads(path.read_text()) if path.is_file() else {"arms": []}
    report.update(prompt=prompt, home=str(home), set_bytes=json.loads((home / "SYNTHETIC.json").read_text())["bytes"],
                  machine=machine())
    for res in res_list:
        for prune in prunes:
            print(f"{NAME} {res} prune={'on' if prune else 'off'}: minivar.sample in a fresh process ...", flush=True)
            arm = measure(res, prune, prompt, home)
            report["arms"] = [a for a in report["arms"] if a["label"] != arm["label"]] + [arm]
            write_text(path, json.dumps(report, indent=1))
            write_text(out / "synthetic.md", synthetic_markdown(report))
            print(arm_line(arm), flush=True)
    print(synthetic_markdown(report))
    return report


def machine() -> dict:
    import platform

    return {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "torch": torch.__version__, "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def arm_line(a: dict) -> str:
    """One table row: phase times, each phase's largest resident set (anonymous + file), the whole run."""
    t, p = a["seconds"], a["peaks"]
    times = " | ".join(f"{t.get(ph, 0):.1f}" for ph in SAMPLE_PHASES)
    peaks = " | ".join(f"{gib(p[ph]['VmRSS'])} ({gib(p[ph]['RssAnon'])} + {gib(p[ph]['RssFile'])})" if ph in p else "-"
                       for ph in SAMPLE_PHASES)
    return f"| {a['label']} | {times} | {peaks} | **{gib(a['ru_maxrss'])}** | {a['peak_phase']} | {a['loadavg'][0]:.1f} |"


def synthetic_markdown(report: dict) -> str:
    size = sum(report["set_bytes"].values()) / 1e9
    lines = [f"Full-size random Infinity-2B set ({size:.2f} GB on disk: bf16 transformer, float32 VAE and "
             f"flan-t5-xl encoder). Each arm is one call, `minivar.sample(prompt, res=..., prune=..., "
             f"model=\"infinity-2b\")` with every other default, in a fresh process, prompt {report['prompt']!r}. "
             "**Whole run** is the child's ru_maxrss as its parent reads it (os.wait4): the kernel's high-water "
             "mark of its resident set, mapped file pages included, the figure a user's machine must hold. Per "
             "phase: the largest VmRSS sampled every 20 ms from /proc/self/status, as anonymous + file-backed "
             "(RssAnon + RssFile). Times in seconds, memory in GiB.", "",
             "| arm | load s | text s | transformer s | VAE s | load | text | transformer | VAE | whole run | "
             "peak phase | load avg |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    return "\n".join(lines + [arm_line(a) for a in report["arms"]]) + "\n"
