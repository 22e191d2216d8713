"""The export step: a checkpoint into one format's bundle, staged and published atomically,
with its README and manifest (hashes, provenance, versions, wall time, peak RSS)."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .bundle import bundle_size, now_iso, staging, write_manifest
from .bundle_readme import render
from .checkpoint import Checkpoint
from .errors import EdgekitError, ToolFailed, UnsupportedArchitecture
from .formats import backend
from .measure import PeakRSS
from .progress import Progress
from .targets import load_targets

ALL = "all"


@dataclass(frozen=True)
class ExportResult:
    bundle: str
    format: str
    model: str
    path_taken: str
    wall_s: float
    peak_rss_mb: float
    size_bytes: int
    files: int
    notes: tuple[str, ...] = ()
    # The ParityReport when the pipeline verified the bundle (None with verify=False). Not part
    # of to_dict: `edgekit export --json` prints the reports in their own list.
    parity: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "parity"}


def targets_for(target: str) -> list[str]:
    """The format names `target` stands for: itself, or every known format for "all"."""
    targets = load_targets()
    if target == ALL:
        return sorted(targets.formats)
    targets.format(target)  # raises with the list of known targets
    return [target]


def recipe_for(name: str, overrides: dict[str, Any] | None) -> Any:
    """The typed recipe of format `name`: its target file's [recipe] with `overrides` on top."""
    spec = load_targets().format(name)
    table = {**spec.recipe, **(overrides or {})}
    return backend(name).parse_recipe(table, f"{spec.source} [recipe]")


def check_architecture(checkpoint: Checkpoint, target: str) -> None:
    mod = backend(target)
    supported = set(mod.SUPPORTED_ARCHITECTURES) | set(getattr(mod, "FALLBACK_ARCHITECTURES", ()))
    if checkpoint.architecture not in supported:
        raise UnsupportedArchitecture(
            f"architecture {checkpoint.architecture} is not supported by {target}",
            f"Supported: {', '.join(sorted(supported))}",
        )


def destinations(checkpoint: Checkpoint, target: str, names: list[str], out: str | Path | None) -> dict[str, Path]:
    """Where each format's bundle goes: `out` itself for one target, a child of it for "all"."""
    dests = {}
    for n in names:
        if out is None:
            dests[n] = Path("dist") / f"{checkpoint.short_name}-{n}"
        elif target == ALL:
            dests[n] = Path(out) / f"{checkpoint.short_name}-{n}"
        else:
            dests[n] = Path(out)
    return dests


def export_one(
    checkpoint: Checkpoint, name: str, recipe: Any, dest: Path, force: bool, progress: Progress
) -> ExportResult:
    spec = load_targets().format(name)
    mod = backend(name)
    progress.note(f"exporting {checkpoint.short_name} ({checkpoint.architecture}) to {name} -> {dest}")
    with staging(dest, force) as tmp:
        with PeakRSS() as usage:
            try:
                notes = mod.export(checkpoint, tmp.resolve(), recipe, progress)  # backends may chdir children
            except (OSError, EdgekitError) as e:
                raise_if_disk_full(tmp, dest, e)
                raise
        manifest: dict[str, Any] = {
            "name": dest.name,
            "format": name,
            "runtime": spec.runtime,
            "created_at": now_iso(),
            "edgekit_version": __version__,
            "source": checkpoint.provenance(),
            "quantization": {**dataclasses.asdict(recipe), **notes.quantization},
            "export": {
                "path_taken": notes.path_taken,
                "wall_s": round(usage.wall_s, 2),
                "peak_rss_mb": round(usage.peak_rss_mb, 1),
                "notes": list(notes.notes),
            },
            "tools": {"edgekit": __version__, **mod.tool_versions(), **notes.tools},
            "reproducible_files": list(notes.reproducible_files),
            "parity": None,
            "bench": {},
        }
        (tmp / "README.md").write_text(render(dest.name, manifest), encoding="utf-8")
        with progress.step("hashing files"):
            manifest = write_manifest(tmp, manifest)
    for n in notes.notes:
        progress.note(f"note: {n}")
    return ExportResult(
        bundle=str(dest),
        format=name,
        model=checkpoint.short_name,
        path_taken=notes.path_taken,
        wall_s=round(usage.wall_s, 2),
        peak_rss_mb=round(usage.peak_rss_mb, 1),
        size_bytes=bundle_size(manifest),
        files=len(manifest["files"]),
        notes=tuple(notes.notes),
    )


def raise_if_disk_full(tmp: Path, dest: Path, error: BaseException) -> None:
    """Converters die of a full disk with messages like "4096 requested and 3424 written";
    name the cause instead. The staging directory is removed on the way out as usual."""
    try:
        free = shutil.disk_usage(tmp).free
    except OSError:
        return
    said = any(m in str(error) for m in ("No space left", "Disk quota", "File too large", " requested and "))
    if free < 4 * 2**20 or said:  # a converter may delete its partial file before we look
        raise ToolFailed(
            f"disk full while exporting to {dest} ({free // 1024} KiB left on that filesystem; "
            f"{type(error).__name__}: {str(error).splitlines()[0][:120]})",
            "Free space or choose another --out; nothing was published",
        ) from None
