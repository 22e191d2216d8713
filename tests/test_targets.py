"""targets/*.toml are data with typed, strict parsing."""

from __future__ import annotations

import shutil

import pytest

from edgekit.errors import BadInput
from edgekit.targets import load_targets, targets_dir


def test_shipped_targets_load():
    t = load_targets()
    assert set(t.formats) == {"onnx-int4", "gguf-q4_k_m"}
    assert set(t.profiles) >= {"laptop-cpu", "m-series", "mobile-onnx"}
    assert t.profile("mobile-onnx").formats == ("onnx-int4",)
    assert t.profile("m-series").gpu_layers == -1


def _copy(tmp_path):
    d = tmp_path / "targets"
    shutil.copytree(targets_dir(), d)
    return d


@pytest.mark.parametrize(
    "file, text, expect",
    [
        ("onnx-int4.toml", "[format\nname=", "malformed TOML"),
        (
            "onnx-int4.toml",
            '[format]\nname="onnx-int4"\ndescription="d"\nruntime="r"\ncolour="red"\n',
            "unknown key 'colour'",
        ),
        ("profiles.toml", '[profiles.x]\nformats=["nope"]\n', "unknown format 'nope'"),
        ("profiles.toml", "[profiles.x]\nthreads=true\n", "'threads' has the wrong type"),
        ("profiles.toml", "[profiles.x]\nwarp=9\n", "unknown key 'warp'"),
    ],
)
def test_bad_target_files(tmp_path, file, text, expect):
    d = _copy(tmp_path)
    (d / file).write_text(text)
    with pytest.raises(BadInput) as e:
        load_targets(d)
    assert expect in str(e.value)


def test_unknown_target_and_profile_names():
    t = load_targets()
    with pytest.raises(BadInput, match="Choose one of: gguf-q4_k_m, onnx-int4, all"):
        t.format("tflite")
    with pytest.raises(BadInput, match="unknown profile"):
        t.profile("watch")
