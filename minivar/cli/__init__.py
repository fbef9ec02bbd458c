"""The command line. It mirrors the Python API: the flags are `Pipeline.generate`'s arguments.

    minivar "a red fox in snow" --res 1024 --aspect 16:9 --seed 1 --out fox.png   # minivar.sample
    minivar batch prompts.jsonl --out DIR --seeds 0,1,2,3                           # batch.py, torchrun-aware
    minivar convert infinity-2b --dtype bf16                                        # convert.py
    minivar download infinity-2b                                                    # hub.py

Known errors (bad flags, missing or broken weights, bad input files) print one line,
`minivar: error: ...`, and exit with status 2. Set MINIVAR_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import sys
import tempfile
import time
from contextlib import suppress
from fractions import Fraction
from pathlib import Path

from ..loading.files import atomic_write, create_new, same_file
from ..model.sampling import Settings
from ..numerics import NUMERICS, resolve as resolve_numerics

COMMANDS = ("batch", "convert", "download")
RESOLUTIONS = (256, 512, 768, 1024, 1344, 2048)
DTYPES = {"stored": None, "fp32": "float32", "bf16": "bfloat16"}


class UsageError(ValueError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (the arguments of Pipeline.generate)")
    g.add_argument("--model", default="infinity-2b", metavar="NAME|PATH",
                   help="infinity-2b, infinity-8b (downloaded on first use), toy (offline), or a model directory "
                        "(default: %(default)s)")
    g.add_argument("--res", type=int, default=None, choices=RESOLUTIONS,
                   help="pixel budget: 256/512/768/1024 as trained, 1344/2048 zero-shot (default: the model's "
                        "own, 1024 for Infinity; the toy draws 64 x 64)")
    g.add_argument("--aspect", default="1:1", metavar="W:H",
                   help="width:height, snapped to the nearest trained template, e.g. 16:9 (default: %(default)s)")
    g.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True,
                   help="FastVAR cached token pruning (default: on)")
    g.add_argument("--cfg", type=float, default=Settings.cfg, metavar="SCALE", help="guidance scale (default: %(default)s)")
    g.add_argument("--tau", type=float, default=Settings.tau, metavar="T", help="sampling temperature (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=Settings.top_k, metavar="K", help="top-k filter per bit (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=Settings.top_p, metavar="P", help="top-p filter per bit (default: %(default)s)")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT", help="text for the unconditional branch")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"),
                   help="cuda uses flash-attn when it is installed (default: %(default)s)")
    g.add_argument("--dtype", default="stored", choices=tuple(DTYPES),
                   help="weight storage: as the files store it, memory-mapped (Infinity bf16), or cast to fp32 "
                        "or bf16 (default: %(default)s)")
    g.add_argument("--numerics", default=None, choices=NUMERICS,
                   help="what the math runs in: auto (bf16 where the device has fast bf16, else fp32), bf16, fp32, "
                        "or reference (upstream's CPU numbers bit for bit) (default: $MINIVAR_NUMERICS or auto)")
    g.add_argument("--revision", default=None, metavar="REV", help="pinned hub revision (commit or tag) for downloads")


def build_parsers() -> dict[str, Parser]:
    gen = Parser(prog="minivar", description="Generate an image from a prompt with Infinity (+ FastVAR pruning).",
                 epilog="other commands: minivar batch --help | minivar convert --help | minivar download --help")
    gen.add_argument("prompt", help="the text prompt")
    gen.add_argument("--seed", type=int, default=Settings.seed, metavar="N", help="sampling seed (default: %(default)s)")
    gen.add_argument("--out", default=None, metavar="FILE", help="image file, replaced if it exists (default: the prompt's first words and the seed, "
                          "e.g. a-red-fox-seed1.png, never replacing an earlier image)")
    gen.add_argument("--trace", default=None, metavar="FILE.pt", help="also save the per-scale trace (torch.save)")
    add_generation_flags(gen)

    batch = Parser(prog="minivar batch", description="Generate one image per (prompt, seed); resumable; "
                   "shards across ranks under torchrun (gloo on CPU, nccl on CUDA).")
    batch.add_argument("prompts", help=".txt (one prompt per line) or .jsonl ({\"prompt\": ..., \"id\": ...} per line)")
    batch.add_argument("--out", required=True, metavar="DIR", help="output folder: PNGs and manifest.jsonl")
    batch.add_argument("--seeds", default="1", metavar="LIST", help="comma-separated seeds, e.g. 0,1,2,3 (default: %(default)s)")
    add_generation_flags(batch)

    convert = Parser(prog="minivar convert", description="Convert Infinity/VAE .pth checkpoints to safetensors "
                     "(written next to them; loading then prefers the .safetensors).")
    convert.add_argument("targets", nargs="+", metavar="FILE|DIR|PRESET",
                         help="a .pth file, a model directory (infinity.pth, vae.pth) or a preset name")
    convert.add_argument("--dtype", default="keep", choices=("keep", "fp32", "bf16"),
                         help="floating tensors' dtype in the output (default: %(default)s, as stored)")
    convert.add_argument("--out", default=None, metavar="FILE", help="output file (only with one .pth target)")

    download = Parser(prog="minivar download", description="Download a preset's files into the weights folder "
                      "($MINIVAR_HOME, default ~/.cache/minivar).")
    download.add_argument("model", help="infinity-2b or infinity-8b")
    download.add_argument("--revision", default=None, metavar="REV", help="pinned hub revision (commit or tag)")
    return {"generate": gen, "batch": batch, "convert": convert, "download": download}


def parse_aspect(text: str) -> float:
    """'16:9' (width:height) -> height / width = 0.5625."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*:\s*([0-9.]+)\s*", text)
    try:
        w, h = (float(m.group(1)), float(m.group(2))) if m else (math.nan, math.nan)
    except ValueError:
        w, h = math.nan, math.nan
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise UsageError(f"--aspect {text!r}: give width:height with two positive numbers, e.g. 16:9 or 1:1")
    from ..model.config import nearest_template

    try:
        nearest_template(h / w)
    except ValueError:
        raise UsageError(f"--aspect {text}: h/w {h / w:.3g} is outside the trained templates (1:3 to 3:1)") from None
    return h / w


def describe_template(h_div_w: float, aspect: str) -> str:
    from ..model.config import nearest_template

    t = nearest_template(h_div_w)
    ratio = Fraction(1 / t).limit_denominator(10)
    return f"aspect {aspect} (h/w {h_div_w:.4g}) -> nearest trained template h/w {t} (about {ratio.numerator}:{ratio.denominator})"


def generation_kwargs(args) -> dict:
    """The flags as keyword arguments of Pipeline.generate (seed aside), checked before anything loads."""
    from ..pipeline import check_arguments

    kwargs = dict(res=args.res, h_div_w=parse_aspect(args.aspect), cfg=args.cfg, tau=args.tau, top_k=args.top_k,
                  top_p=args.top_p, negative_prompt=args.negative_prompt, prune=args.prune)
    check_arguments(**kwargs)
    return kwargs


def check_device_flag(device: str) -> None:
    import torch

    from ..pipeline import device_available

    if not device_available(device):
        raise UsageError(f"--device {device}: not available in this torch build ({torch.__version__}); use --device cpu")


def check_writable(folder: Path, what: str) -> None:
    """Fail before loading anything if `folder` cannot take new files (tries to create one)."""
    if not folder.is_dir():
        raise UsageError(f"cannot write {what}: folder {folder} does not exist")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"cannot write {what} in {folder}: {e.strerror or e}") from None


def load_pipeline(args, device: str):
    import torch

    from ..pipeline import load

    t0 = time.perf_counter()
    dtype = None if DTYPES[args.dtype] is None else getattr(torch, DTYPES[args.dtype])
    pipe = load(args.model, device=device, dtype=dtype, revision=args.revision, numerics=args.numerics)
    print(f"loaded {pipe.name} on {device} ({args.dtype}) in {time.perf_counter() - t0:.1f} s; numerics "
          f"{pipe.numerics} ({pipe.numerics_reason})", file=sys.stderr)
    return pipe


# --------------------------------------------------------------------------------------------------
# minivar "prompt"
# --------------------------------------------------------------------------------------------------
class ScaleTimer:
    """The scale loop's progress hook: a tqdm bar over the scales, and the seconds each one took."""

    def __init__(self, device: str, show: bool = True):
        import torch

        self.seconds: dict[int, float] = {}
        self.show = show
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __call__(self, ran: list[int]):
        from tqdm.auto import tqdm

        for si in tqdm(ran, desc="scales", unit="scale", leave=False, disable=not self.show):
            t0 = time.perf_counter()
            yield si
            self.sync()  # CUDA runs asynchronously: wait before reading the clock
            self.seconds[si] = time.perf_counter() - t0


def reserve_out(prompt: str, seed: int, folder: Path = Path(".")) -> Path:
    """The default image name, taken: the prompt's first words and the seed, e.g. a-red-fox-seed1.png, or
    if that exists the first free a-red-fox-seed1-2.png, -3 ...: a run never replaces an earlier image
    unless --out names it.

    The name is taken by creating the file, empty (O_EXCL: no two processes can both create it), so two
    runs started together get two names; the image replaces this placeholder once it is made, and
    `drop_placeholder` removes it if the run fails."""
    stem = "-".join(re.findall(r"[A-Za-z0-9]+", prompt.lower())[:6]) or "minivar"
    for n in itertools.count(1):
        path = folder / (f"{stem}-seed{seed}.png" if n == 1 else f"{stem}-seed{seed}-{n}.png")
        try:
            os.close(create_new(path))
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"cannot write the image {path}: {e.strerror or e}; give --out FILE") from None


def drop_placeholder(path: Path) -> None:
    """Remove a name `reserve_out` took if it never got its image (it is still empty)."""
    with suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


def check_output(path: Path, flag: str) -> None:
    """Fail before loading anything if the file `path` cannot be written."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    check_writable(path.parent, f"{flag} {path}")


def cmd_generate(args) -> int:
    from PIL import Image

    from .batch import save_image_atomic, stop_on_sigterm
    from ..pipeline import check_arguments

    check_arguments(prompt=args.prompt, seed=args.seed)
    kwargs = generation_kwargs(args)
    if args.out and Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--out {args.out}: unknown image type {Path(args.out).suffix!r}; use .png, .jpg or .webp")
    for flag, path in (("--out", args.out), ("--trace", args.trace)):
        if path:
            check_output(Path(path), flag)
    check_device_flag(args.device)
    stop_on_sigterm()  # a stopped run then removes its temporary file and its placeholder
    out_path = Path(args.out) if args.out else reserve_out(args.prompt, args.seed)
    try:
        if args.trace and same_file(out_path, Path(args.trace)):
            raise UsageError(f"--trace {args.trace} would overwrite the image {out_path}; give it another name")
        print(describe_template(kwargs["h_div_w"], args.aspect), file=sys.stderr)
        pipe = load_pipeline(args, args.device)
        timer = ScaleTimer(args.device)
        out = pipe.generate(args.prompt, seed=args.seed, trace=bool(args.trace), progress=timer, **kwargs)
        save_image_atomic(out.image, out_path)
    except BaseException:
        if not args.out:
            drop_placeholder(out_path)
        raise
    if args.trace:
        save_trace(out.trace, Path(args.trace))
    print_timings(out, timer.seconds)
    print(f"saved {out_path} ({out.image.width}x{out.image.height})")
    return 0


def print_timings(out, seconds: dict[int, float]) -> None:
    rows = [f"{out.scales[si][0]}x{out.scales[si][1]} {seconds[si]:.3f}" for si in sorted(seconds)]
    skipped = len(out.scales) - len(seconds)
    print("per scale (grid seconds): " + ", ".join(rows) + (f"; {skipped} scale(s) skipped by pruning" if skipped else ""))
    t = out.timings
    print(f"scales total {sum(seconds.values()):.2f} s | text encode {t['text']:.2f} s | "
          f"transformer {t['transformer']:.2f} s | VAE decode {t['vae']:.2f} s | total {sum(t.values()):.2f} s")


def save_trace(trace, path: Path) -> None:
    """The trace as plain dicts, lists and tensors (readable with torch.load(weights_only=True))."""
    import dataclasses

    import torch

    data = {f.name: getattr(trace, f.name) for f in dataclasses.fields(trace)}
    data["pruning"] = {si: dataclasses.asdict(rec) for si, rec in trace.pruning.items()}
    atomic_write(path, lambda f: torch.save(data, f))


# --------------------------------------------------------------------------------------------------
# minivar batch | convert | download
# --------------------------------------------------------------------------------------------------
def cmd_batch(args) -> int:
    from . import batch

    kwargs = generation_kwargs(args)
    seeds = batch.parse_seeds(args.seeds)
    check_device_flag(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_writable(out_dir, f"--out {out_dir}")
    prompts, problems = batch.read_prompts(args.prompts)
    settings = {"model": model_id(args.model), "revision": args.revision, **kwargs, "dtype": args.dtype,
                "device": args.device, "numerics": resolve_numerics(args.numerics, args.device)[0]}
    jobs = batch.make_jobs(prompts, seeds)
    batch.check_prompts(out_dir, jobs)  # early, for a quick answer; run_batch checks again under the folder's lock
    batch.check_settings(out_dir, settings)
    batch.stop_on_sigterm()
    ranks = batch.init_ranks(args.device)
    if ranks.rank == 0:
        for msg in problems:
            print(f"minivar: warning: {msg}", file=sys.stderr)
    device = f"cuda:{ranks.local_rank}" if args.device == "cuda" else args.device
    result = batch.run_batch(lambda: load_pipeline(args, device), jobs, out_dir, kwargs, settings, ranks)
    if result.stale_lock_pid is not None:
        print(f"minivar: warning: took over the lock of an earlier run (pid {result.stale_lock_pid}) that no longer "
              "runs", file=sys.stderr)
    if ranks.rank == 0:
        print(f"{result.manifest_records} of {len(jobs)} images done in {out_dir} "
              f"(rank 0 generated {result.generated}, found {result.skipped_done} finished); "
              f"manifest: {out_dir / batch.MANIFEST}" + (f"; {len(problems)} input line(s) skipped" if problems else ""))
    return 0


def model_id(model: str) -> str:
    """A preset name, or a model directory as an absolute path (so reruns from elsewhere compare equal)."""
    from ..loading.hub import SPECS

    return model if model in SPECS or not Path(model).expanduser().is_dir() else str(Path(model).expanduser().resolve())


def cmd_convert(args) -> int:
    from ..loading.convert import convert, convert_targets

    sources = [p for t in args.targets for p in convert_targets(t)]
    if args.out and len(sources) != 1:
        raise UsageError(f"--out needs exactly one .pth to convert, got {len(sources)}")
    for src in sources:
        t0 = time.perf_counter()
        dst = convert(src, args.out, args.dtype)
        print(f"{src} -> {dst} ({args.dtype}, {dst.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_download(args) -> int:
    from ..loading.hub import download

    files = download(args.model, revision=args.revision)
    for part in ("transformer", "vae", "text_encoder"):
        print(f"{part}: {getattr(files, part)}")
    return 0


HANDLERS = {"generate": cmd_generate, "batch": cmd_batch, "convert": cmd_convert, "download": cmd_download}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "generate"  # `minivar -- batch`: a prompt
    try:
        args = build_parsers()[command].parse_args(argv)
        return HANDLERS[command](args)
    except Exception as e:
        if os.environ.get("MINIVAR_DEBUG") or not is_known(e):
            raise
        print(f"minivar: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minivar: interrupted", file=sys.stderr)
        return 130


def is_known(e: Exception) -> bool:
    """Errors that are about the input or the machine, not bugs in minivar."""
    import torch

    return isinstance(e, (ValueError, OSError, MemoryError, torch.OutOfMemoryError))


def one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


if __name__ == "__main__":
    sys.exit(main())
