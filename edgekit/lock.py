"""A per-output-directory lock, so two edgekit processes never write the same outputs at once."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BadInput

LOCK_NAME = ".edgekit.lock"


class Busy(BadInput):
    """Another edgekit process holds the lock on this output (exit 2: wait, or pick another --out)."""


@contextmanager
def output_lock(directory: Path, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on DIR/NAME; the kernel drops it if the process
    dies, so a killed run never leaves the output locked."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Busy(f"another edgekit process (pid {other}) is writing to {directory}",
                       "Wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
