"""Property-based fuzzing of everything edgekit parses from files it did not write: targets and
profiles TOML, edgekit.toml, manifest.json, bundle tarballs. Any input gives a valid object or
an EdgekitError with exit code 2 or 4 — never another exception."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import record

from edgekit.errors import EdgekitError
from edgekit.targets import targets_dir

ROOT = Path(__file__).resolve().parent.parent
# derandomize: the same examples every run, so CI is stable and docs/reliability.md does not churn.
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

KEYS = st.sampled_from(
    [
        "format",
        "recipe",
        "thresholds",
        "tune",
        "profiles",
        "name",
        "description",
        "runtime",
        "model_files",
        "block_size",
        "threads",
        "formats",
        "context",
        "build",
        "model",
        "source",
        "budgets",
        "regression",
        "reps",
        "laptop-cpu",
        "onnx-int4",
        "gguf-q4_k_m",
        "set",
        "x",
    ]
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["physical", "onnx-int4", "gguf-q4_k_m", "laptop-cpu", "."]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"


def toml_doc(doc: dict) -> str:
    lines = []
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"[{json.dumps(key)}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                lines.append(f"[[{json.dumps(key)}]]")
                lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.insert(0, f"{json.dumps(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


DOCS = st.dictionaries(KEYS, VALUES, max_size=5)


@st.composite
def mutated(draw, text: str):
    """A real file with lines dropped, duplicated, swapped, or characters replaced."""
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "dup", "char", "value"]))
        if op == "drop":
            lines.pop(i)
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "char" and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:j] + draw(st.sampled_from(list("[]=\"'#.{}x0 \t"))) + lines[i][j + 1 :]
        elif "=" in lines[i]:
            lines[i] = lines[i].split("=")[0] + "= " + toml_value(draw(VALUES))
    return "\n".join(lines) + "\n"


def _expect_clean(fn, counts: dict):
    try:
        fn()
        counts["valid"] = counts.get("valid", 0) + 1
    except EdgekitError as e:
        assert e.exit_code in (2, 4), e
        assert "\n" not in e.one_line()
        counts[f"exit {e.exit_code}"] = counts.get(f"exit {e.exit_code}", 0) + 1


def _record(category: str, counts: dict):
    for outcome, n in sorted(counts.items()):
        for _ in range(n):
            record("fuzz", category, "generated input", outcome, passed=True)


def _load_targets(directory: Path):
    from edgekit.targets import _load, load_targets

    _load.cache_clear()
    try:
        return load_targets(directory)
    finally:
        _load.cache_clear()


@pytest.mark.parametrize("which", ["onnx-int4.toml", "profiles.toml"])
def test_targets_and_profiles_parsers(tmp_path_factory, which):
    counts: dict = {}
    original = (targets_dir() / which).read_text()

    @SETTINGS
    @given(text=st.one_of(mutated(original), DOCS.map(toml_doc), st.text(max_size=200)))
    def run(text):
        d = tmp_path_factory.mktemp("targets")
        shutil.copytree(targets_dir(), d, dirs_exist_ok=True)
        (d / which).write_text(text)
        _expect_clean(lambda: _load_targets(d), counts)

    run()
    assert sum(counts.values()) >= 100
    _record(f"targets/{which}", counts)


def test_build_config_parser(tmp_path_factory):
    from edgekit.buildconfig import load_config

    counts: dict = {}
    original = (ROOT / "edgekit.toml").read_text()

    @SETTINGS
    @given(text=st.one_of(mutated(original), DOCS.map(toml_doc), st.text(max_size=200)))
    def run(text):
        p = tmp_path_factory.mktemp("cfg") / "edgekit.toml"
        p.write_text(text)
        _expect_clean(lambda: load_config(p).jobs(), counts)

    run()
    assert counts.get("valid", 0) > 0 and counts.get("exit 2", 0) > 0
    _record("edgekit.toml", counts)


@pytest.mark.slow
def test_manifest_parser(tiny_gguf, tmp_path_factory):
    from edgekit.bundle import validate

    counts: dict = {}
    real = json.loads((tiny_gguf / "manifest.json").read_text())
    fields = sorted(real)

    @st.composite
    def manifests(draw):
        if draw(st.booleans()):
            return draw(VALUES)
        m = json.loads(json.dumps(real))
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(fields))
            if draw(st.booleans()):
                m.pop(key, None)
            else:
                m[key] = draw(VALUES)
        if draw(st.booleans()) and isinstance(m.get("files"), list) and m["files"]:
            entry = dict(m["files"][0]) if isinstance(m["files"][0], dict) else {}
            entry[draw(st.sampled_from(["path", "size", "sha256"]))] = draw(
                st.one_of(VALUES, st.sampled_from(["../escape", "/etc/passwd", "model.gguf", -1]))
            )
            m["files"][0] = entry
        return m

    @SETTINGS
    @given(doc=manifests(), raw=st.booleans(), junk=st.binary(max_size=64))
    def run(doc, raw, junk):
        b = tmp_path_factory.mktemp("bundle")
        shutil.copytree(tiny_gguf, b, dirs_exist_ok=True)
        (b / "manifest.json").write_bytes(junk if raw else json.dumps(doc).encode())
        _expect_clean(lambda: validate(b), counts)

    run()
    assert counts.get("exit 4", 0) > 0
    _record("manifest.json", counts)


@pytest.mark.slow
def test_tarball_validation(tiny_gguf, tmp_path_factory):
    from edgekit.tarball import check_members, extract_safely, pack

    counts: dict = {}
    good = tmp_path_factory.mktemp("good") / "b.tar.gz"
    pack(tiny_gguf, good)
    good_bytes = good.read_bytes()
    names = st.one_of(
        st.sampled_from(["b", "b/x", "b/../x", "/abs", "../up", "b/./y", "c/z", "b//w", "", "b/\\x"]),
        st.text(min_size=1, max_size=20),
    )
    kinds = st.sampled_from(
        [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
    )

    @st.composite
    def archives(draw):
        choice = draw(st.integers(0, 2))
        if choice == 0:  # a real tarball, cut or with bytes flipped
            data = bytearray(good_bytes)
            if draw(st.booleans()):
                data = data[: draw(st.integers(0, len(data)))]
            for _ in range(draw(st.integers(0, 3))):
                if data:
                    i = draw(st.integers(0, len(data) - 1))
                    data[i] ^= draw(st.integers(1, 255))
            return bytes(data)
        if choice == 1:
            return draw(st.binary(max_size=512))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            for _ in range(draw(st.integers(1, 4))):
                info = tarfile.TarInfo(draw(names))
                info.type = draw(kinds)
                payload = draw(st.binary(max_size=16)) if info.type == tarfile.REGTYPE else b""
                info.size = len(payload)
                if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = draw(names)
                t.addfile(info, io.BytesIO(payload))
        return buf.getvalue()

    @SETTINGS
    @given(data=archives())
    def run(data):
        d = tmp_path_factory.mktemp("tar")
        p = d / "x.tar.gz"
        p.write_bytes(data)
        outside_before = set(d.parent.iterdir())

        def go():
            check_members(p)
            extract_safely(p, d / "out")

        _expect_clean(go, counts)
        assert set(d.parent.iterdir()) == outside_before  # nothing escaped the extraction dir

    run()
    assert counts.get("exit 4", 0) > 0
    _record("tarball", counts)
