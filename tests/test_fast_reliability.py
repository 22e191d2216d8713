"""docs/reliability.md takes each case's verdict from how its test ended: run a small suite
through the real conftest hook in a child pytest and read what it would write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

INNER_CONFTEST = f"""
import importlib.util, sys
sys.path.insert(0, {str(TESTS)!r})
spec = importlib.util.spec_from_file_location("edgekit_tests_conftest", {str(TESTS / "conftest.py")!r})
real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)
pytest_runtest_makereport = real.pytest_runtest_makereport  # the hook under test, unchanged

import pytest

@pytest.fixture
def broken():
    raise OSError("no space left on device")

def pytest_sessionfinish(session, exitstatus):
    from reliability import render
    (session.config.rootpath / "doc.md").write_text(render())
"""

INNER_TESTS = """
import pytest
from reliability import record

def test_recorded_and_passed():
    record("fault", "disk full", "export into a small disk", "exit 1, cause named", passed=True)

def test_recorded_then_failed():
    record("fault", "disk full", "build into a small disk", "exit 1, cause named", passed=True)
    assert 1 == 2, "a partial bundle was published"

def test_recorded_its_own_failure():
    record("fault", "concurrency", "two exports", "exit 0 twice", passed=False)

@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_signal_during_export(sig):
    raise TimeoutError("the export never started")

def test_fixture_errors(broken):
    record("fault", "never", "reached", "-", passed=True)

def test_skipped():
    pytest.skip("no tmpfs")
"""


def test_failed_and_errored_tests_are_recorded_as_failed(tmp_path):
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_faults.py").write_text(INNER_TESTS)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 1, r.stdout + r.stderr  # the inner suite has failures on purpose
    doc = (tmp_path / "doc.md").read_text()
    assert "Cases: 5; passed: 1; failed: 4." in doc, doc
    assert "| fault | disk full | 2 | 1 | " in doc, doc
    assert (
        "- fault / disk full: build into a small disk -> exit 1, cause named; call failed: "
        "AssertionError: a partial bundle was published"
    ) in doc, doc
    assert "- fault / concurrency: two exports -> exit 0 twice (FAILED)" in doc, doc
    assert "- fault / signal during export: SIGTERM -> call failed: TimeoutError: the export never started" in doc
    assert "- fault / fixture errors: test_fixture_errors -> setup failed: OSError: no space left on device" in doc
    assert "no tmpfs" not in doc and "skipped" not in doc  # a skip is not a case that ran
