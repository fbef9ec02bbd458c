"""Writing files so that no run can lose or half-write one: atomic replacement and a folder lock.

`atomic_write` writes into a hidden temporary next to the target, flushes it to disk, then renames
it over the target: a reader (or a later run after a kill) sees the old file or the new one, never a
mix. `FolderLock` keeps two processes from writing into one output folder at once; the kernel
drops a `flock` when its holder dies, so a lock file left by a killed run is simply taken over.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

LOCK_FILE = ".minivar.lock"


def partial_path(path: Path) -> Path:
    """The hidden temporary a file is written to before its rename (never matches *.png or *.jsonl)."""
    return path.with_name(f".{path.name}.partial")


def atomic_write(path: Path, write: Callable[[BinaryIO], None],
                 before_rename: Callable[[], None] = lambda: None) -> Path:
    """Call `write(f)` on a temporary in `path`'s folder, fsync it, then rename it to `path`.

    On any error (or a kill) `path` keeps its old content, or stays absent, and the temporary is removed.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        before_rename()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
