"""Resource preflight: refuse an export the host cannot finish, before it starts.

A 14B export that runs out of memory after 20 minutes (or fills the disk with a half-written
f16 intermediate) wastes a CI runner; estimating from the checkpoint's size costs nothing.
The estimates are ceilings fitted on measured exports (each format's PREFLIGHT_COST, with
the measurements beside it); `--force` overrides.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .errors import BadInput
from .formats import REGISTRY, ExportCost, backend

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def cost(fmt: str) -> ExportCost | None:
    """The format's fitted ceilings (its backend's PREFLIGHT_COST), None for a format without."""
    if fmt not in REGISTRY:
        return None
    return getattr(backend(fmt), "PREFLIGHT_COST", None)


@dataclass(frozen=True)
class Needs:
    format: str
    parameters: int
    ram_mb: float
    disk_mb: float
    # Set when the export holds the whole model although the format can stream: why, and the
    # RAM the streamed path would need.
    whole_model_because: str | None = None
    streamed_ram_mb: float | None = None


def parameter_count(checkpoint: Checkpoint) -> int:
    """From the safetensors headers (no weights read); pickle files: bytes / 2 as a guess."""
    total = 0
    for name in checkpoint.weight_files:
        path = Path(checkpoint.path) / name
        if not name.endswith(".safetensors"):
            total += path.stat().st_size // 2
            continue
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))  # checkpoint.check_safetensors validated it already
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                total += (end - begin) // _DTYPE_BYTES.get(info.get("dtype", "F32"), 4)
    return total


def estimate(checkpoint: Checkpoint, fmt: str, recipe: Any = None) -> Needs:
    """RAM and disk the export of `checkpoint` to `fmt` needs, for the path `recipe` (default:
    the format's default recipe) makes it take."""
    c = cost(fmt)
    if c is None:
        raise BadInput(f"no resource estimate for {fmt}", "Export it with --force to skip the preflight")
    params = parameter_count(checkpoint)
    fp32_mb = params * 4 / 2**20
    ram = c.ram_fixed_mb + c.ram_per_fp32_byte * fp32_mb
    disk = c.disk_fixed_mb + c.disk_per_fp32_byte * fp32_mb
    if c.whole_ram_fixed_mb is None or c.whole_ram_per_fp32_byte is None:
        return Needs(fmt, params, ram, disk)
    if recipe is None:
        from .exporting import recipe_for

        recipe = recipe_for(fmt, None)
    because = backend(fmt).why_not_streamed_export(checkpoint, recipe)
    if because is None:
        return Needs(fmt, params, ram, disk)
    whole = c.whole_ram_fixed_mb + c.whole_ram_per_fp32_byte * fp32_mb
    return Needs(fmt, params, max(whole, ram), disk, whole_model_because=because, streamed_ram_mb=ram)


def available(dest: Path) -> tuple[float, float]:
    """(RAM MiB, free disk MiB at dest). EDGEKIT_PREFLIGHT_RAM_MB / _DISK_MB pretend a smaller
    host, so tests can exercise the refusal."""
    ram = psutil.virtual_memory().available / 2**20
    probe = Path(dest).absolute()
    while not probe.exists():
        probe = probe.parent
    disk = shutil.disk_usage(probe).free / 2**20
    ram = float(os.environ.get("EDGEKIT_PREFLIGHT_RAM_MB", ram))
    disk = float(os.environ.get("EDGEKIT_PREFLIGHT_DISK_MB", disk))
    return ram, disk


def check(
    checkpoint: Checkpoint, dests: dict[str, Path], force: bool, recipes: dict[str, Any] | None = None
) -> list[Needs]:
    """Raise BadInput with the figures if any export would not fit; --force skips the refusal.
    Exports run one after another, so RAM is checked per format and disk for all together.
    `recipes` (format -> typed recipe) pick the path; a refusal of a whole-model path that the
    streamed one would fit says so."""
    recipes = recipes or {}
    needs = [estimate(checkpoint, fmt, recipes.get(fmt)) for fmt in dests if cost(fmt) is not None]
    if not needs or force:
        return needs
    ram, disk = available(next(iter(dests.values())))
    worst = max(needs, key=lambda n: n.ram_mb)
    if worst.ram_mb > ram:
        problem = (
            f"exporting {checkpoint.short_name} ({worst.parameters / 1e6:.0f}M parameters) to {worst.format} needs about "
            f"{worst.ram_mb / 1024:.1f} GiB of RAM; this host has {ram / 1024:.1f} GiB available"
        )
        fix = "Free memory, use a larger machine, or pass --force to try anyway"
        if worst.whole_model_because:
            problem += f" (it holds the whole model: {worst.whole_model_because})"
            if worst.streamed_ram_mb is not None and worst.streamed_ram_mb <= ram:
                fix = (
                    f"The streamed export needs about {worst.streamed_ram_mb / 1024:.1f} GiB and fits: "
                    "keep the default recipe's weight_search and engine, or pass --force to try this one"
                )
        raise BadInput(problem, fix)
    disk_needed = sum(n.disk_mb for n in needs)
    if disk_needed > disk:
        raise BadInput(
            f"exporting {checkpoint.short_name} needs about {disk_needed:.0f} MiB of free disk at the destination; "
            f"it has {disk:.0f} MiB",
            "Free space, choose another --out, or pass --force to try anyway",
        )
    return needs
