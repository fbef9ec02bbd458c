"""Batch generation: prompts x seeds, one PNG each, resumable, sharded over torch.distributed ranks.

    minivar batch prompts.jsonl --out DIR --seeds 0,1,2,3
    torchrun --nproc-per-node 4 -m minivar batch prompts.jsonl --out DIR --seeds 0,1,2,3

A *job* is one (prompt, seed) pair; jobs are listed in file order, seeds innermost. Rank r of W takes
jobs r, r + W, r + 2W, ... of the full list, so the shards are disjoint whatever earlier runs
finished, and each image is generated alone (batch of one): its pixels depend on its prompt, seed and
settings only, never on the rank, the number of ranks or its neighbours.

Surviving a kill: an image is written to a new hidden temporary file, its manifest record is appended
to the rank's own part file, and only then is the image renamed into place. So every image that exists
is complete and has a record, and a rerun simply skips the images that exist. At the end rank 0
merges the part files into DIR/manifest.jsonl (one record per finished image, in job order).

Ranks meet at the end through marker files in DIR (`.minivar.rank<r>.done`); a rank that fails leaves
`.minivar.rank<r>.failed` instead, with its error, and the others stop at their next image or while
waiting, rather than in torch.distributed's barrier, which would wait out its 24-hour timeout.

Uses pipeline.py's argument checks (the seed and prompt limits) and loading/files.py (atomic writes, the
folder lock); cli/__init__.py builds the pipeline and calls `run_batch`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from PIL import Image

from ..loading.files import FolderBusy, FolderLock, atomic_write, open_own, temporaries, write_text
from ..pipeline import MAX_PROMPT_CHARS, check_seed, is_visible

MANIFEST = "manifest.jsonl"
MAX_ID_BYTES = 200  # a file name holds 255 bytes: the id, "_seed<n>.png" and its temporary's ".<name>.<hex 8>.partial"
PART = "manifest.rank{rank}.jsonl"
RANK_MARK = ".minivar.rank{rank}.{state}"  # state: done or failed
POLL_SECONDS = 1.0  # how often a rank that finished looks at the others' markers
RANK_TIMEOUT = timedelta(hours=24)  # how long ranks wait for each other: uneven shards may take long
# settings that change pixels: a rerun into the same folder must use the same ones (the device and the
# hub revision too: the sampler's random numbers differ between CPU and CUDA, and weights between revisions)
PIXEL_SETTINGS = ("model", "revision", "res", "h_div_w", "cfg", "tau", "top_k", "top_p", "negative_prompt", "prune",
                  "dtype", "device", "numerics")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    line: int
    meta: dict = field(default_factory=dict, hash=False, compare=False)  # other fields of a JSON line


@dataclass(frozen=True)
class Job:
    prompt: Prompt
    seed: int

    @property
    def file(self) -> str:
        return f"{self.prompt.id}_seed{self.seed}.png"


# --------------------------------------------------------------------------------------------------
# Reading prompts
# --------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> tuple[list[Prompt], list[str]]:
    """Prompts of a .txt (one per line) or .jsonl file ({"prompt": ..., "id": ...} per line).

    Returns the prompts and one message per skipped line (`file:line: reason`); blank lines are ignored.
    """
    path = Path(path)
    as_json = path.suffix in (".jsonl", ".json")
    prompts, problems, seen = [], [], {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of line 1
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            p = parse_line(raw, lineno, as_json)
            if p.id in seen:
                raise ValueError(f"duplicate id {p.id!r} (first on line {seen[p.id]})")
        except ValueError as e:
            problems.append(f"{path}:{lineno}: {e}; line skipped")
            continue
        seen[p.id] = lineno
        prompts.append(p)
    return prompts, problems


def parse_line(raw: str, lineno: int, as_json: bool) -> Prompt:
    if not as_json:
        return Prompt(f"{lineno - 1:05d}", check_prompt_length(raw.strip()), lineno)
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise ValueError('expected an object with a non-empty string "prompt"')
    check_encodable(obj)
    pid = safe_id(obj["id"]) if "id" in obj else f"{lineno - 1:05d}"
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "id")}
    return Prompt(pid, check_prompt_length(obj["prompt"].strip()), lineno, meta)


def check_prompt_length(text: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt of {len(text)} characters is too long (max {MAX_PROMPT_CHARS})")
    if not any(map(is_visible, text)):  # generate would refuse it half way through the batch
        raise ValueError("the prompt has nothing visible (only zero-width, format or blank characters)")
    return text


def check_encodable(obj: dict) -> None:
    """JSON can spell an unpaired surrogate ("\\udcff"), which is not text: no file or tokenizer can take it."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end].encode("unicode_escape").decode()
        raise ValueError(f"holds an unpaired surrogate {bad}, which is not valid text") from None


def safe_id(value) -> str:
    """An id usable in a file name, distinct for distinct ids as far as possible.

    Letters and digits of any script, '-', '_' and '.' are kept; other ASCII characters become '_'
    (so "a/b c" is "a_b_c"); other characters become their code point ("🐱" is "u1f431").
    """
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f'"id" must be a string or an integer, got {value!r}')
    text = unicodedata.normalize("NFC", str(value).strip())
    text = "".join(c if c.isalnum() or c in "._-" else "_" if c.isascii() else f"u{ord(c):04x}" for c in text)
    if not text or text.startswith("."):
        raise ValueError(f'"id" {value!r} cannot name a file')
    if len(text.encode()) > MAX_ID_BYTES:
        raise ValueError(f'"id" of {len(text.encode())} bytes is too long for a file name (max {MAX_ID_BYTES})')
    return text


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers like 0,1,2,3, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs at least one seed and no repeats, got {text!r}")
    for seed in seeds:
        check_seed("--seeds", seed)
    return seeds


def make_jobs(prompts: list[Prompt], seeds: list[int]) -> list[Job]:
    return [Job(p, s) for p in prompts for s in seeds]


def shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    return jobs[rank::world]


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def save_image_atomic(image: Image.Image, path: Path, before_rename: Callable[[], None] = lambda: None) -> None:
    """Write `image` (format from the suffix) so that `path` either does not exist or is complete."""
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda f: image.save(f, format=fmt), before_rename)


def append_record(part: Path, record: dict) -> None:
    """Append one JSON line, durably. A line torn by an earlier kill is closed off first."""
    with open(open_own(part, os.O_RDWR | os.O_APPEND), "a+b") as f:  # never through a symlink planted there
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[dict]:
    """The well-formed records of a JSON-lines file (a torn last line is ignored)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("file"), str):
            out.append(rec)
    return out


def known_records(out_dir: Path) -> dict[str, dict]:
    """file -> latest record, over the merged manifest and every rank's part file."""
    records = {}
    for path in [out_dir / MANIFEST, *sorted(out_dir.glob(PART.format(rank="*")))]:
        records |= {r["file"]: r for r in read_records(path)}
    return records


def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to mix images made with other pixel-changing settings into one folder."""
    for rec in known_records(out_dir).values():
        old = rec.get("settings", {})
        diff = [k for k in PIXEL_SETTINGS if k in old and old[k] != settings.get(k)]
        if diff and (out_dir / rec["file"]).exists():
            k = diff[0]
            raise ValueError(f"{out_dir} holds images made with {k}={old[k]!r}, not {settings.get(k)!r}; "
                             "rerun with the same settings to resume, or use another --out")


def check_prompts(out_dir: Path, jobs: list[Job]) -> None:
    """Refuse to resume when lines of the prompts file changed since their images were made.

    An image is named after its line's id and seed, not its text, so an edited line would otherwise keep
    the old prompt's image. Refusing (rather than overwriting) never throws away a finished image.
    """
    records = known_records(out_dir)
    changed: dict[int, tuple[str, str]] = {}
    for job in jobs:
        old = records.get(job.file, {}).get("prompt")
        if isinstance(old, str) and old != job.prompt.text and (out_dir / job.file).exists():
            changed.setdefault(job.prompt.line, (old, job.prompt.text))
    if changed:
        lines = sorted(changed)
        old, new = changed[lines[0]]
        shown = ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if len(lines) > 10 else "")
        raise ValueError(f"{out_dir} holds images of other prompts for line(s) {shown} of the prompts file "
                         f"(line {lines[0]} was {old[:80]!r}, now {new[:80]!r}); restore those lines, delete their "
                         "images to make them again, or use another --out")


def merge_manifest(out_dir: Path, jobs: list[Job]) -> int:
    """Rank 0, after every rank finished: one record per existing image into manifest.jsonl (the part
    files and the ranks' markers are then removed)."""
    order = {j.file: i for i, j in enumerate(jobs)}
    records = [r for r in known_records(out_dir).values() if (out_dir / r["file"]).exists()]
    records.sort(key=lambda r: (order.get(r["file"], len(order)), r["file"]))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text(out_dir / MANIFEST, text)
    for part in out_dir.glob(PART.format(rank="*")):
        part.unlink()
    clear_marks(out_dir)
    return len(records)


# --------------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------------
@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_true(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (every rank must call this)."""
        if self.world == 1:
            return ok
        import torch
        import torch.distributed as dist

        device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


def init_ranks(device: str) -> Ranks:
    """Join the process group a launcher (torchrun, ...) set up in the environment; one rank otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=RANK_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


class RankFailed(ValueError):
    """Another rank of the run failed; this one stops too."""


def mark(out_dir: Path, rank: int, state: str, text: str = "") -> None:
    write_text(out_dir / RANK_MARK.format(rank=rank, state=state), text)


def clear_marks(out_dir: Path) -> None:
    for p in out_dir.glob(RANK_MARK.format(rank="*", state="*")):
        p.unlink(missing_ok=True)


def check_peers(out_dir: Path, ranks: Ranks) -> None:
    """Raise RankFailed if another rank left its failure marker."""
    for r in range(ranks.world):
        failed = out_dir / RANK_MARK.format(rank=r, state="failed")
        if r != ranks.rank and failed.is_file():
            why = failed.read_text(encoding="utf-8", errors="replace")[:300]
            raise RankFailed(f"rank {r} of {ranks.world} failed ({why}), so rank {ranks.rank} stops too; "
                             "finished images are kept: rerun the same command to resume")


@contextmanager
def telling_peers(out_dir: Path, ranks: Ranks) -> Iterator[None]:
    """Run the body; if it raises, leave this rank's failure marker (with the error) for the other ranks."""
    try:
        yield
    except BaseException as e:
        if ranks.world > 1 and not isinstance(e, RankFailed):
            with suppress(OSError):  # a full disk, say: the original error matters more
                mark(out_dir, ranks.rank, "failed", " ".join(str(e).split()) or type(e).__name__)
        raise


def wait_for_ranks(out_dir: Path, ranks: Ranks) -> None:
    """The end-of-run barrier: mark this rank done, then wait until every rank is, stopping as soon as
    one has failed instead (dist.barrier alone would wait for a dead rank until its timeout)."""
    if ranks.world == 1:
        return
    mark(out_dir, ranks.rank, "done")
    done = [out_dir / RANK_MARK.format(rank=r, state="done") for r in range(ranks.world)]
    deadline = time.monotonic() + RANK_TIMEOUT.total_seconds()
    while not all(p.exists() for p in done):
        check_peers(out_dir, ranks)
        if time.monotonic() > deadline:  # a rank killed outright (SIGKILL, out of memory) leaves no marker
            late = [r for r, p in enumerate(done) if not p.exists()]
            raise RankFailed(f"rank(s) {late} did not finish within {RANK_TIMEOUT}; finished images are kept: "
                             "rerun the same command to resume")
        time.sleep(POLL_SECONDS)
    ranks.barrier()  # every rank is here: this returns at once, and rank 0 may then remove the markers


def stop_on_sigterm() -> None:
    """Turn SIGTERM (what launchers send to stop workers) into SystemExit, so temporaries are cleaned up."""
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    generated: int
    skipped_done: int
    manifest_records: int | None  # rank 0 only
    stale_lock_pid: int | None = None  # the dead run whose lock was taken over (rank 0 only)


def lock_folder(out_dir: Path, ranks: Ranks) -> FolderLock | None:
    """Rank 0 locks the folder for the whole run (and drops an earlier run's rank markers); every rank
    stops if it could not."""
    lock, busy = FolderLock(out_dir, "minivar batch run"), None
    if ranks.rank == 0:
        try:
            lock.acquire()
            clear_marks(out_dir)
        except (ValueError, OSError) as e:  # every rank must reach all_true below, or the others hang there
            lock.release()
            busy = e
    if not ranks.all_true(busy is None):
        raise busy or FolderBusy(f"{out_dir} is in use by another minivar batch run (rank 0 could not lock it)")
    return lock if ranks.rank == 0 else None


def run_batch(load_pipeline: Callable[[], object], jobs: list[Job], out_dir: Path, gen_kwargs: dict,
              settings: dict, ranks: Ranks, show_progress: bool = True) -> BatchResult:
    """Lock the folder, check it holds nothing made otherwise, generate this rank's unfinished jobs,
    then (rank 0) merge the manifest."""
    lock = lock_folder(out_dir, ranks)
    try:
        with telling_peers(out_dir, ranks):
            check_prompts(out_dir, jobs)
            check_settings(out_dir, settings)
            mine = shard(jobs, ranks.rank, ranks.world)
            for job in mine:  # a temporary left by a killed run is never finished: drop it
                for tmp in temporaries(out_dir / job.file):
                    tmp.unlink(missing_ok=True)
            todo = [j for j in mine if not (out_dir / j.file).exists()]
            if todo:
                pipe = load_pipeline()
                part = out_dir / PART.format(rank=ranks.rank)
                for job in progress_bar(todo, show_progress and ranks.rank == 0, ranks.world):
                    check_peers(out_dir, ranks)
                    generate_one(pipe, job, out_dir, part, gen_kwargs, settings, ranks.rank)
        wait_for_ranks(out_dir, ranks)
        merged = merge_manifest(out_dir, jobs) if ranks.rank == 0 else None
    finally:
        if lock is not None:
            lock.release()
    return BatchResult(len(todo), len(mine) - len(todo), merged, lock.stale_pid if lock else None)


def generate_one(pipe, job: Job, out_dir: Path, part: Path, gen_kwargs: dict, settings: dict, rank: int) -> None:
    out = pipe.generate(job.prompt.text, seed=job.seed, **gen_kwargs)
    timings = {k: round(v, 4) for k, v in out.timings.items()}
    timings["total"] = round(sum(out.timings.values()), 4)
    record = {"id": job.prompt.id, "prompt": job.prompt.text, "seed": job.seed, "file": job.file,
              "line": job.prompt.line, "settings": settings, "timings": timings, "rank": rank, "meta": job.prompt.meta}
    save_image_atomic(out.image, out_dir / job.file, before_rename=lambda: append_record(part, record))


def progress_bar(todo: list[Job], show: bool, world: int):
    from tqdm.auto import tqdm

    return tqdm(todo, desc="images" + (f" (rank 0 of {world})" if world > 1 else ""), unit="img", disable=not show)
