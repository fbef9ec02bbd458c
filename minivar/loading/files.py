"""Writing files so that no run can lose or half-write one: atomic replacement and a folder lock.

`atomic_write` writes into a new hidden temporary next to the target, flushes it to disk, then
renames it over the target: a reader (or a later run after a kill) sees the old file or the new one,
never a mix. Every file minivar creates in a folder that others may write to is created with O_EXCL
(`create_new`): the kernel then refuses a name that exists, a symlink included, so a link planted
under a name minivar is about to use can never redirect the write onto another file.

`FolderLock` keeps two processes from writing into one output folder at once; the kernel drops a
`flock` when its holder dies, so a lock file left by a killed run is simply taken over.
"""
from __future__ import annotations

import errno
import glob
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

LOCK_FILE = ".minivar.lock"
TEMPORARY_GLOB = ".{name}." + "[0-9a-f]" * 8 + ".partial"  # the names `new_temporary` picks for `name`


def create_new(path: Path) -> int:
    """Create `path` and open it for writing; FileExistsError if any file or link has that name."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def open_own(path: Path, flags: int) -> int:
    """Open, creating it if needed, a file minivar keeps under a fixed name in an output folder (a lock, a
    manifest part); a symlink put there instead is refused rather than followed."""
    try:
        return os.open(path, flags | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise ValueError(f"{path} is a symbolic link where minivar keeps a file of its own; remove it") from None


def new_temporary(path: Path) -> tuple[int, Path]:
    """A new hidden file next to `path`, `.NAME.<8 random hex>.partial` (never matches *.png or *.jsonl),
    open for writing. The random part keeps concurrent writers of one target apart."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            return create_new(tmp), tmp
        except FileExistsError:
            continue


def temporaries(path: Path) -> list[Path]:
    """The temporaries of `path` left by writes that never finished (a killed run)."""
    return sorted(path.parent.glob(TEMPORARY_GLOB.format(name=glob.escape(path.name))))


def atomic_write(path: Path, write: Callable[[BinaryIO], None],
                 before_rename: Callable[[], None] = lambda: None) -> Path:
    """Call `write(f)` on a new temporary in `path`'s folder, fsync it, then rename it to `path`.

    On any error (or a kill) `path` keeps its old content, or stays absent, and the temporary is removed.
    The rename replaces whatever `path` names, a symlink itself rather than its target.
    """
    path = Path(path)
    fd, tmp = new_temporary(path)
    try:
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, through symlinks and hard links."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return Path(a).resolve() == Path(b).resolve()


class FolderBusy(ValueError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on a folder, held by one process (a `flock` on DIR/.minivar.lock that records its pid).

        with FolderLock(out_dir, "minivar batch"):
            ...  # nobody else writes into out_dir

    The lock file is removed on release. A process that finds the file but can take the lock knows its
    holder died (the kernel drops a dead process's locks) and takes it over; `stale_pid` says whose it was.
    """

    def __init__(self, folder: Path, what: str):
        self.path, self.what = Path(folder) / LOCK_FILE, what
        self.fd: int | None = None
        self.stale_pid: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        while True:
            fd = open_own(self.path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_pid(fd)
                os.close(fd)
                raise FolderBusy(f"{self.path.parent} is in use by another {self.what} (pid {holder or 'unknown'}); "
                                 "wait for it to finish, or use another output folder") from None
            if same_inode(fd, self.path):  # not a file a releasing holder unlinked meanwhile
                break
            os.close(fd)
        self.stale_pid = read_pid(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiter then sees a replaced file
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def same_inode(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
