"""Atomic file and directory publication: a reader sees the old file or the new one, never half.

Every writer in edgekit that leaves something a user or a later run reads (manifests, summaries,
caches, result files) goes through here, so "nothing half-written" is kept in one place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _sibling(path: Path, tag: str) -> Path:
    # Same directory as the target so os.replace is a rename on one filesystem; pid + random
    # suffix so two processes publishing the same name never share a temporary.
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that needs a file name (np.savez, a
    converter); it replaces `path` only when the block finishes without an exception."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_dir(directory: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `directory`; on success it becomes `directory`
    (see publish_dir), on failure it is removed."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(directory, "staging")
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, directory: Path) -> None:
    """Move a finished staging directory into place. For caches: if another process published
    the same entry first, keep theirs (entries are content-addressed, so they are equal)."""
    try:
        os.replace(tmp, directory)
    except OSError:
        if not directory.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
