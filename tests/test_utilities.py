"""The shared utilities: atomic publication and the one gate record."""

from __future__ import annotations

import pytest

from edgekit import fileio
from edgekit.errors import BadInput, ExitCode, GateFailed, IntegrityError, OutOfMemory
from edgekit.gates import Gate, failed


def test_write_json_replaces_whole_and_leaves_no_temporaries(tmp_path):
    p = tmp_path / "a.json"
    fileio.write_json(p, {"a": 1})
    fileio.write_json(p, {"b": 2})
    assert p.read_text() == '{\n  "b": 2\n}\n'
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]


def test_staged_file_keeps_old_content_when_the_writer_fails(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), fileio.staged_file(p) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["w.bin"]


def test_staged_dir_publishes_on_success_and_cleans_on_failure(tmp_path):
    with fileio.staged_dir(tmp_path / "ok") as d:
        (d / "f").write_text("x")
    assert (tmp_path / "ok" / "f").read_text() == "x"
    with pytest.raises(ValueError), fileio.staged_dir(tmp_path / "bad") as d:
        (d / "f").write_text("x")
        raise ValueError
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ok"]


def test_publish_dir_keeps_the_first_publisher(tmp_path):
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "f").write_text("first")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "g").write_text("second")
    fileio.publish_dir(tmp, tmp_path / "entry")  # a non-empty target: os.replace fails, theirs stays
    assert (tmp_path / "entry" / "f").read_text() == "first"
    assert not tmp.exists()


@pytest.mark.parametrize(
    "figure, op, threshold, passed",
    [
        (0.05, "<=", 0.1, True),
        (0.2, "<=", 0.1, False),
        (0.9, ">=", 0.8, True),
        (True, "==", True, True),
        (False, "==", True, False),
        (None, "<=", 1.0, False),
    ],
)
def test_gate_check(figure, op, threshold, passed):
    g = Gate.check("parity", "x", figure, op, threshold)
    assert g.passed is passed
    assert Gate.from_dict(g.to_dict()) == g
    assert ("fails" in g.text()) is not passed


def test_regression_gate_records_baseline_and_delta():
    g = Gate.check("regression", "kld_mean", 0.07, "<=", 0.066, baseline=0.06)
    assert (g.passed, g.delta) == (False, 0.01)
    assert g.to_dict()["baseline"] == 0.06
    assert failed([g, Gate.check("parity", "y", 1, ">=", 0)]) == [g]
    with pytest.raises(ValueError):
        Gate.check("parity", "z", 1, "<", 2)


def test_exit_codes_are_the_documented_ones():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 130]
    assert (
        BadInput("x").exit_code,
        GateFailed("x").exit_code,
        IntegrityError("x").exit_code,
        OutOfMemory("x").exit_code,
    ) == (ExitCode.BAD_INPUT, ExitCode.GATE_FAILED, ExitCode.INTEGRITY, ExitCode.ERROR)


def test_release_memory_trims_on_glibc_and_is_harmless(monkeypatch):
    import platform

    import numpy as np

    from edgekit import memory

    live = np.arange(1_000_000, dtype=np.float32)
    garbage = [np.ones(10_000) for _ in range(100)]
    del garbage
    assert memory.release_memory() is (platform.libc_ver()[0] == "glibc")
    assert memory.release_memory() is (platform.libc_ver()[0] == "glibc")  # again: nothing left, no harm
    assert float(live[-1]) == 999_999.0  # what is live stays
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)  # musl, macOS, Windows: only gc runs
    assert memory.release_memory() is False
