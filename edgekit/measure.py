"""Process-tree memory and wall-time measurement shared by export and bench."""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil


@dataclass(frozen=True)
class Usage:
    wall_s: float
    peak_rss_mb: float


class PeakRSS:
    """Samples the RSS of this process plus its children (converters run as subprocesses)
    every `interval` seconds (psutil walks /proc for the children: 0.1 s keeps that
    under a few % of a core), and also takes the kernel's ru_maxrss high-water marks, which
    catch peaks shorter than the interval. ru_maxrss of a long-lived process only grows, so
    the sampled figure is the one that describes a single step; both are kept.
    """

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.wall_s = 0.0

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            try:
                total = me.memory_info().rss
                for child in me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_bytes = max(self.peak_bytes, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.wall_s = time.perf_counter() - self._t0

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_bytes / 2**20

    def usage(self) -> Usage:
        return Usage(wall_s=round(self.wall_s, 3), peak_rss_mb=round(self.peak_rss_mb, 1))


def maxrss_mb(children: bool = False) -> float:
    """Kernel high-water mark (Linux reports KiB)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def tree_rss_bytes(root: psutil.Process) -> int:
    """RSS of a psutil.Process and all its descendants (processes that vanish count 0)."""
    import psutil

    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def memory_limit_bytes() -> int:
    """What the processes here may use: the cgroup's memory.max if one is set, else physical
    RAM. EDGEKIT_MEMORY_LIMIT_MB pretends a smaller host (tests)."""
    import os

    import psutil

    if os.environ.get("EDGEKIT_MEMORY_LIMIT_MB"):
        return int(float(os.environ["EDGEKIT_MEMORY_LIMIT_MB"]) * 2**20)
    limit = psutil.virtual_memory().total
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            limit = min(limit, int(text))
    except OSError:
        pass
    return limit


class ChildWatch:
    """Samples one child's process tree (its RSS) and the host's available memory while the
    child runs, so that a SIGKILL can be told apart: the kernel's OOM killer, or someone else."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.min_available: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(root))
            avail = psutil.virtual_memory().available
            self.min_available = avail if self.min_available is None else min(self.min_available, avail)
            self._stop.wait(self.interval)

    def __enter__(self) -> ChildWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def out_of_memory(self, returncode: int | None, what: str) -> str | None:
        """The one-line reason when `returncode` says SIGKILL and memory was nearly gone (the
        child's tree at 80 % of the limit, or the host with under 5 % available), else None."""
        import signal

        import psutil

        if returncode != -signal.SIGKILL:
            return None
        limit = memory_limit_bytes()
        near = self.peak_bytes >= 0.8 * limit or (
            self.min_available is not None and self.min_available <= 0.05 * psutil.virtual_memory().total
        )
        if not near:
            return None
        return (
            f"out of memory: {what} reached {self.peak_bytes / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB "
            "and was killed by the kernel (SIGKILL)"
        )
