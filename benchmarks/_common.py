"""Helpers shared by the benchmark scripts: host facts, measured subprocess runs, the tables in README.md and docs/."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def host_facts() -> dict:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def host_line(facts: dict) -> str:
    return (
        f"{facts['cpu']}, {facts['logical_cores']} cores, {facts['ram_gb']} GB RAM, "
        f"{facts['os']}, Python {facts['python']}"
    )


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_rss_mb: float  # sampled sum over the process tree (the converter may be a grandchild)
    maxrss_mb: float  # kernel high-water mark of the largest single process in the tree
    returncode: int
    stdout: str
    stderr: str


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.02) -> Measured:
    """Run a command, sampling the RSS of its whole process tree; the same method for
    edgekit and for the raw tools, so their figures are comparable."""
    import psutil

    from edgekit.measure import tree_rss_bytes

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(root))
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return Measured(round(wall, 2), round(peak / 2**20, 1), round(maxrss, 1), proc.returncode, out, err)


def write_results(name: str, doc: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")


def update_doc(marker: str, markdown: str) -> None:
    """Replace the text between <!-- marker:start --> and <!-- marker:end --> in the page that has
    those markers: README.md (the headline table) or one of docs/*.md (the long tables)."""
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        if pattern.search(text):
            page.write_text(pattern.sub(lambda m: m.group(1) + markdown.rstrip() + "\n" + m.group(2), text))
            return
    raise SystemExit(f"neither README.md nor docs/*.md has {marker} markers")


BENCH_BUNDLES = ROOT / "dist" / "bench"


def ensure_bundles(name: str, model: str, formats: tuple[str, ...], root: Path = BENCH_BUNDLES) -> dict[str, Path]:
    """format -> bundle of `model` under root, exported once and reused by every benchmark
    that measures the same SmolLM2 bundles (bench_table, harness_overhead, eval_*)."""
    from edgekit import api

    out = {}
    for fmt in formats:
        dest = root / f"{model}-{fmt}"
        if not (dest / "manifest.json").is_file():
            print(f"[{name}] exporting {model} to {fmt} -> {dest}", file=sys.stderr)
            api.export(model, fmt, dest, force=True, verify=False)
        out[fmt] = dest
    return out


def venv_python() -> str:
    return sys.executable
