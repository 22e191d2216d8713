"""Atomic bundle writing and validation (exit 4 on any mismatch)."""

from __future__ import annotations

import json
import os

import pytest

from edgekit.bundle import clean_stale_temps, staging, update_manifest, validate, write_manifest
from edgekit.errors import BadInput, IntegrityError


def _bundle(tmp_path):
    dest = tmp_path / "b"
    with staging(dest) as tmp:
        (tmp / "model.bin").write_bytes(b"weights" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "tok.json").write_text("{}")
        write_manifest(tmp, {"format": "gguf-q4_k_m", "source": {}})
    return dest


def test_staging_publishes_only_on_success(tmp_path):
    dest = _bundle(tmp_path)
    assert validate(dest)["format"] == "gguf-q4_k_m"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_failed_export_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError), staging(dest) as tmp:
        (tmp / "half.gguf").write_bytes(b"x")
        raise RuntimeError("converter died")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    dest = _bundle(tmp_path)
    with pytest.raises(BadInput, match="--force"), staging(dest):
        pass
    with staging(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        write_manifest(tmp, {"format": "onnx-int4", "source": {}})
    assert validate(dest)["format"] == "onnx-int4"
    assert not (dest / "model.bin").exists()


def test_stale_temp_of_dead_process_is_removed(tmp_path):
    stale = tmp_path / ".b.edgekit-tmp-999999999-abcd"
    stale.mkdir()
    assert clean_stale_temps(tmp_path) == [stale]
    assert not stale.exists()


def test_read_only_parent_refused(tmp_path):
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root ignores mode bits: a read-only mount is what refuses it
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
    try:
        with pytest.raises(BadInput, match="permission denied"), staging(ro / "b"):
            pass
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda b: (b / "model.bin").write_bytes(b"Weights" * 100), "does not match its sha256"),
        (lambda b: (b / "model.bin").write_bytes(b"w"), "has 1 bytes"),
        (lambda b: (b / "sub" / "tok.json").unlink(), "is missing"),
        (lambda b: (b / "extra.txt").write_text("x"), "not in the manifest"),
        (lambda b: (b / "manifest.json").write_text("{"), "not valid JSON"),
        (lambda b: update_manifest(b, schema_version=99), "schema_version 99"),
    ],
)
def test_validate_detects_damage(tmp_path, damage, expect):
    dest = _bundle(tmp_path)
    damage(dest)
    with pytest.raises(IntegrityError) as e:
        validate(dest)
    assert expect in str(e.value)
    assert e.value.exit_code == 4


def test_not_a_bundle(tmp_path):
    with pytest.raises(BadInput, match="not an edgekit bundle"):
        validate(tmp_path)


def test_manifest_lists_every_file_with_hash(tmp_path):
    dest = _bundle(tmp_path)
    m = json.loads((dest / "manifest.json").read_text())
    assert [f["path"] for f in m["files"]] == ["model.bin", "sub/tok.json"]
    assert all(len(f["sha256"]) == 64 for f in m["files"])
