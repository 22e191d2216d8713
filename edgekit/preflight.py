"""Resource preflight: refuse an export the host cannot finish, before it starts.

A 14B export that runs out of memory after 20 minutes (or fills the disk with a half-written
f16 intermediate) wastes a CI runner; estimating from the checkpoint's size costs nothing.
The estimates are ceilings fitted on measured exports (each format's PREFLIGHT_COST, with
the measurements beside it); `--force` overrides.
"""

from __future__ import annotations

import json
import os
import re
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


@dataclass(frozen=True)
class Shapes:
    """What the RAM ceilings scale with, in parameters (elements), from the checkpoint headers."""

    parameters: int
    largest: int  # the largest tensor: the embedding or lm_head
    layer: int  # one decoder layer (layer 0)


# A decoder layer's tensors: "model.layers.0.mlp...", "transformer.h.0....", "language_model.model.layers.0...".
_LAYER0 = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.0\.")


def shapes_of(tensors: dict[str, int], num_layers: int | None = None) -> Shapes:
    """Shapes from {tensor name: element count}."""
    total = sum(tensors.values())
    largest = max(tensors.values(), default=0)
    layer = sum(n for name, n in tensors.items() if _LAYER0.search(name))
    if not layer and num_layers:
        layer = max(total - 2 * largest, 0) // num_layers
    return Shapes(total, largest, layer)


def checkpoint_shapes(checkpoint: Checkpoint) -> Shapes:
    """From the safetensors headers (no weights read). Pickle files carry no header: their bytes
    / 2 count as parameters, a tenth as the largest tensor, the rest split over the layers."""
    tensors: dict[str, int] = {}
    guessed = 0
    for name in checkpoint.weight_files:
        path = Path(checkpoint.path) / name
        if not name.endswith(".safetensors"):
            guessed += path.stat().st_size // 2
            continue
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))  # checkpoint.check_safetensors validated it already
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                tensors[key] = (end - begin) // _DTYPE_BYTES.get(info.get("dtype", "F32"), 4)
    cfg = checkpoint.config.get("text_config") or checkpoint.config
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1)
    if guessed:
        tensors["(pickle: largest, guessed)"] = guessed // 10
        tensors["(pickle: the rest)"] = guessed - guessed // 10
    return shapes_of(tensors, layers)


def parameter_count(checkpoint: Checkpoint) -> int:
    return checkpoint_shapes(checkpoint).parameters


def ram_mb(c: ExportCost, shapes: Shapes) -> float:
    """The streamed path's RAM ceiling for these shapes, MiB."""
    mib = 4 / 2**20  # fp32 bytes per element, in MiB
    return c.ram_fixed_mb + c.ram_per_largest * shapes.largest * mib + c.ram_per_layer * shapes.layer * mib


def estimate(checkpoint: Checkpoint, fmt: str, recipe: Any = None) -> Needs:
    """RAM and disk the export of `checkpoint` to `fmt` needs, for the path `recipe` (default:
    the format's default recipe) makes it take."""
    c = cost(fmt)
    if c is None:
        raise BadInput(f"no resource estimate for {fmt}", "Export it with --force to skip the preflight")
    shapes = checkpoint_shapes(checkpoint)
    params = shapes.parameters
    fp32_mb = params * 4 / 2**20
    ram = ram_mb(c, shapes)
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
