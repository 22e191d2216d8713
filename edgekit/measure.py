"""Process-tree memory and wall-time measurement shared by export and bench."""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass


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

    def __enter__(self) -> "PeakRSS":
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
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
