"""bench and its budget gates on the fake format (tests/fakeformat.py): the benchmark child opens
the plugin format through the protocol, records land in the manifest, and a budget the bundle
breaks exits 3 (the build's budget gate: tests/test_fast_build.py). No runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakeformat import NAME, fake_format  # noqa: F401 - the fixture, used by pytestmark

pytestmark = pytest.mark.usefixtures("fake_format")

EDGEKIT = str(Path(sys.executable).parent / "edgekit")


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEKIT, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_bench_records_and_the_budget_gate(tiny_phi3, tmp_path):
    b = tmp_path / "b"
    assert cli("export", tiny_phi3, "--target", NAME, "--no-verify", "--out", b, "-q").returncode == 0

    r = cli("bench", b, "--profile", "fake-cpu", "--reps", "2", "--json", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    (rec,) = json.loads(r.stdout)
    assert rec["format"] == NAME and rec["profile"] == "fake-cpu" and rec["reps"] == 2
    assert rec["decode_tok_s"] > 0 and rec["peak_rss_mb"] > 0 and rec["passed"]
    assert rec["runtime"] == {"fakeformat": "1.0"}  # what the backend's bench_runtime says
    stored = json.loads((b / "manifest.json").read_text())["bench"]
    assert "fake-cpu" in json.dumps(stored)
    assert cli("validate", b).returncode == 0  # the manifest was re-hashed

    # A peak-RSS budget no process meets: reported in full, then exit 3 naming it.
    r = cli("bench", b, "--profile", "fake-cpu", "--reps", "1", "--set", "max_peak_rss_mb=1", "--json", "-q")
    assert r.returncode == 3, r.stderr[-2000:]
    (rec,) = json.loads(r.stdout)
    assert not rec["passed"] and rec["budget_failures"], rec
    assert "peak" in r.stderr.strip().splitlines()[-1], r.stderr


def test_json_keeps_progress_on_stderr_and_quiet_silences_it(tiny_phi3, tmp_path):
    """--json: stdout is exactly one JSON document, progress stays on stderr (a CI log of a long
    step shows it is alive), an error is stderr's last line; -q leaves stderr empty."""
    b = tmp_path / "b"
    assert cli("export", tiny_phi3, "--target", NAME, "--no-verify", "--out", b, "-q").returncode == 0
    args = ("bench", b, "--profile", "fake-cpu", "--reps", "1", "--no-manifest", "--json")

    r = cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    (rec,) = json.loads(r.stdout)  # json.loads takes one document and nothing else
    assert rec["format"] == NAME
    progress = [ln for ln in r.stderr.splitlines() if ln.startswith("bench b")]
    assert progress[0] == "bench b ..." and progress[-1].startswith("bench b: done in"), r.stderr

    quiet = cli(*args, "-q")
    assert quiet.returncode == 0 and len(json.loads(quiet.stdout)) == 1
    assert quiet.stderr == "", quiet.stderr

    failed = cli(*args, "--set", "max_peak_rss_mb=1")
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 3 and len(json.loads(failed.stdout)) == 1
    assert any(ln.startswith("bench b ...") for ln in lines) and lines[-1].startswith("error: "), failed.stderr
