"""The machine a benchmark runs on: facts, a stable id, and its measured memory read bandwidth.

Decoding a small model is bound by how fast the weights stream from memory, so a tokens/sec
figure means little without the bandwidth of the host that produced it. The bandwidth is
measured once per host (numpy sums over a 512 MB buffer, one thread per core, best of five)
and cached in cache_dir()/host.json under the host id.

Also the process's own memory figures (current and peak RSS), read the same way in the
benchmark child and anywhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .paths import cache_dir

if TYPE_CHECKING:
    from .progress import Progress

HOST_FILE = "host.json"
BANDWIDTH_MB = 512
BANDWIDTH_REPEATS = 5


@dataclass(frozen=True)
class HostFacts:
    host_id: str
    cpu: str
    machine: str  # x86_64, arm64, aarch64
    physical_cores: int
    logical_cores: int
    performance_cores: int | None  # Apple silicon P-cores; None where the OS does not say
    ram_gb: float
    os: str
    apple_silicon: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _cpu_model() -> str:
    if sys.platform == "darwin":
        brand = _sysctl("machdep.cpu.brand_string")
        if brand:
            return brand
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def facts() -> HostFacts:
    machine = platform.machine().lower()
    apple = sys.platform == "darwin" and machine in ("arm64", "aarch64")
    perf = _sysctl("hw.perflevel0.physicalcpu") if apple else None
    cpu = _cpu_model()
    logical = os.cpu_count() or 1
    ram_gb = round(_ram_bytes() / 2**30, 1)
    os_name = f"{platform.system()} {platform.release()}"
    # The id names the machine (hostname) and what it is, so a cached bandwidth never
    # follows a hostname onto different hardware; kernel updates do not change it.
    digest = hashlib.sha256(f"{cpu}|{machine}|{logical}|{ram_gb}|{platform.system()}".encode()).hexdigest()[:8]
    node = (platform.node() or "host").split(".")[0]
    return HostFacts(
        host_id=f"{node}-{digest}",
        cpu=cpu,
        machine=machine,
        physical_cores=_physical_cores(),
        logical_cores=logical,
        performance_cores=int(perf) if perf and perf.isdigit() else None,
        ram_gb=ram_gb,
        os=os_name,
        apple_silicon=apple,
    )


def measure_read_bandwidth(
    size_mb: int = BANDWIDTH_MB, repeats: int = BANDWIDTH_REPEATS, threads: int | None = None
) -> float:
    """Bytes/s a plain streaming read achieves: numpy sums over slices of one buffer, one
    thread per core (numpy releases the GIL in reductions), best of `repeats`."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = threads or os.cpu_count() or 1
    buf = np.ones(size_mb * 2**20 // 8, dtype=np.float64)  # written once, so every page is resident
    parts = np.array_split(buf, threads)
    best = float("inf")
    try:
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(np.sum, parts))
                best = min(best, time.perf_counter() - t0)
    finally:
        del parts, buf
    return size_mb * 2**20 / best


def _host_file() -> Path:
    return cache_dir() / HOST_FILE


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(_host_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def read_bandwidth_gbs(host: HostFacts | None = None, refresh: bool = False, progress: Progress | None = None) -> float:
    """This host's read bandwidth in GB/s (10^9 bytes/s), measured on first use and cached."""
    host = host or facts()
    cached = _read_cache()
    entry = cached.get(host.host_id)
    if not refresh and isinstance(entry, dict) and isinstance(entry.get("read_bandwidth_gbs"), (int, float)):
        return float(entry["read_bandwidth_gbs"])
    if progress is not None:
        progress.note(f"measuring this host's memory read bandwidth (once; cached in {_host_file()})")
    gbs = round(measure_read_bandwidth() / 1e9, 2)
    cached = _read_cache()  # re-read: another process may have written meanwhile
    cached[host.host_id] = {
        "read_bandwidth_gbs": gbs,
        "method": f"numpy sum over a {BANDWIDTH_MB} MB float64 buffer, {os.cpu_count()} threads, best of {BANDWIDTH_REPEATS}",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "facts": host.to_dict(),
    }
    path = _host_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cached, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return gbs


# --- this process's memory ---------------------------------------------------------------------


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float:
    """Resident set size of this process now."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's own peak RSS since it started.

    On Linux this is VmHWM, not getrusage's ru_maxrss: a child started with vfork+exec (what
    subprocess does) inherits its parent's high-water mark in ru_maxrss, so a benchmark child
    of a 1 GB parent would report at least 1 GB. VmHWM belongs to the new address space only.
    """
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes, else KiB
