"""A per-output-directory lock, so two edgekit processes never write the same outputs at once."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInput

LOCK_NAME = ".edgekit.lock"


class Busy(BadInput):
    """Another edgekit process holds the lock on this output (exit 2: wait, or pick another --out)."""


@contextmanager
def output_lock(directory: Path, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on DIR/NAME; the kernel drops it if the process
    dies, so a killed run never leaves the output locked. The file is removed on release, so
    nothing is left behind; a process that opened it just before the removal notices that its
    inode is no longer the path's and opens the new file instead."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Busy(
                f"another edgekit process (pid {other}) is writing to {directory}",
                "Wait for it to finish, or choose another --out",
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its holder had just removed: try the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)
