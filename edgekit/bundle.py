"""Bundles on disk: atomic writing, manifest with hashes, validation.

A bundle is built in a hidden temporary directory beside its destination and renamed into
place only when complete, so an interrupted or failed export never leaves a half bundle at
the destination. Temporary directories of dead processes are removed on the next run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .checkpoint import sha256_file
from .errors import BadInput, IntegrityError

MANIFEST = "manifest.json"
SCHEMA = "edgekit.bundle"
SCHEMA_VERSION = 1
TMP_MARK = ".edgekit-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process whose parent died first stays a zombie until init reaps it (some
    # container inits never do): it holds nothing, so its temp dirs are stale.
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except Exception:  # noqa: BLE001 - no psutil view of it: assume alive, keep its files
        return True


def clean_stale_temps(parent: Path) -> list[Path]:
    """Remove temp dirs left by killed edgekit processes (name carries the owner's pid)."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        if TMP_MARK not in p.name or not p.is_dir():
            continue
        try:
            pid = int(p.name.split(TMP_MARK, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_destination(dest: Path, force: bool) -> None:
    """Fail before any work if the destination cannot be written or would be overwritten."""
    if dest.exists() and not dest.is_dir():
        raise BadInput(f"--out {dest} exists and is a file", "Choose a directory path for the bundle")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise BadInput(f"--out {dest} exists and is not empty", "Pass --force to replace it, or choose another --out")
    parent = dest.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write to {probe} (permission denied)", "Choose an --out in a writable directory")


@contextmanager
def staging(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside `dest`; on success rename it to `dest`, else delete it."""
    from .lock import output_lock

    dest = Path(dest)
    check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One writer per destination: a second export into the same --out fails at once, clearly.
    with output_lock(dest.parent, f".{dest.name}.edgekit.lock"):
        clean_stale_temps(dest.parent)
        check_destination(dest, force)  # another process may have published while we waited to start
        tmp = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            publish(tmp, dest, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def publish(tmp: Path, dest: Path, force: bool) -> None:
    old = None
    if dest.exists():
        if any(dest.iterdir()) and not force:
            raise BadInput(f"--out {dest} appeared while exporting", "Pass --force to replace it")
        old = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_entries(root: Path) -> list[dict[str, Any]]:
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise IntegrityError(f"{p} is a symbolic link", "Bundles hold regular files only")
        if p.is_file() and p.name != MANIFEST:
            entries.append({"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)})
    return entries


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `root` and write manifest.json (files listed sorted, stable keys)."""
    manifest = dict(manifest)
    manifest["schema"] = SCHEMA
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["files"] = file_entries(root)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(bundle: Path) -> dict[str, Any]:
    bundle = Path(bundle)
    if not bundle.exists():
        raise BadInput(f"no such bundle: {bundle}", "Pass a directory written by `edgekit export`")
    if not bundle.is_dir():
        raise BadInput(f"{bundle} is not a bundle directory", "Pass a directory written by `edgekit export`")
    mpath = bundle / MANIFEST
    if not mpath.is_file():
        raise BadInput(
            f"{bundle} is not an edgekit bundle (no {MANIFEST})", "Pass a directory written by `edgekit export`"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{mpath} is not valid JSON ({e})", "Re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise IntegrityError(f"{mpath} is not an edgekit manifest", "Re-export the bundle")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise IntegrityError(
            f"{mpath} has schema_version {version!r}; this edgekit reads {SCHEMA_VERSION}",
            "Re-export the bundle with this edgekit version",
        )
    for key, typ in (("format", str), ("files", list), ("source", dict)):
        if not isinstance(manifest.get(key), typ):
            raise IntegrityError(f"{mpath}: '{key}' is missing or malformed", "Re-export the bundle")
    return manifest


def validate(bundle: Path, check_hashes: bool = True) -> dict[str, Any]:
    """Manifest schema, then every file's size and sha256, and no missing or extra files."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    listed: dict[str, dict[str, Any]] = {}
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or not {"path", "size", "sha256"} <= set(entry):
            raise IntegrityError(f"{bundle / MANIFEST}: malformed file entry {entry!r}", "Re-export the bundle")
        rel = str(entry["path"])
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise IntegrityError(f"manifest lists an unsafe path '{rel}'", "Do not use this bundle")
        listed[rel] = entry
    present = {
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MANIFEST
    }
    for rel in sorted(set(listed) - present):
        raise IntegrityError(f"{bundle}: file '{rel}' is missing", "Re-export or re-download the bundle")
    for rel in sorted(present - set(listed)):
        raise IntegrityError(f"{bundle}: file '{rel}' is not in the manifest", "Remove it or re-export the bundle")
    for rel, entry in sorted(listed.items()):
        p = bundle / rel
        if p.is_symlink():
            raise IntegrityError(f"{bundle}: '{rel}' is a symbolic link", "Bundles hold regular files only")
        if p.stat().st_size != entry["size"]:
            raise IntegrityError(
                f"{bundle}: '{rel}' has {p.stat().st_size} bytes, manifest says {entry['size']}",
                "The file is damaged: re-export or re-download",
            )
        if check_hashes and sha256_file(p) != entry["sha256"]:
            raise IntegrityError(
                f"{bundle}: '{rel}' does not match its sha256 in the manifest",
                "The file is damaged: re-export or re-download",
            )
    return manifest


def update_manifest(bundle: Path, **sections: Any) -> dict[str, Any]:
    """Replace top-level sections (parity, bench) without touching the file list."""
    manifest = read_manifest(bundle)
    manifest.update(sections)
    tmp = Path(bundle) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, Path(bundle) / MANIFEST)
    return manifest


def bundle_size(manifest: dict[str, Any]) -> int:
    return sum(int(e["size"]) for e in manifest["files"])
