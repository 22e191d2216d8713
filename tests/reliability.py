"""Collects what the reliability tests tried, so docs/reliability.md is written by the tests
themselves (tests/conftest.py writes it at the end of a full run).

A test calls `record(...)` with what it observed; the record is held until pytest reports how the
test ended (`observe`, from conftest's pytest_runtest_makereport hook). A test that failed or
errored after recording turns its records into failures, and a reliability test that failed before
it could record leaves one failed record naming the error, so the document shows failures as they
happened instead of only the runs that reached their last line."""

from __future__ import annotations

import os
import platform
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"

# test module -> the kind its unrecorded failures are filed under (modules that call record()).
KINDS = {
    "test_bad_input": "bad input",  # one CLI run per bad input: exit code, one line, nothing written
    "test_faults": "fault",  # signals, full disks, concurrency during export and build
    "test_fuzz": "fuzz",  # generated config/manifest/tarball inputs to the parsers
}


@dataclass(frozen=True)
class Outcome:
    kind: str  # "bad input", "fault", "fuzz"
    category: str
    case: str
    outcome: str
    passed: bool
    half_written: int  # files or directories left behind, half-written or modified


RECORDS: list[Outcome] = []  # settled: the test that recorded them has ended
_PENDING: list[Outcome] = []  # recorded by the running test, settled by observe()
_FAILURE: dict[str, str] = {}  # nodeid -> first failure line of the running test (any phase)


def record(kind: str, category: str, case: str, outcome: str, *, passed: bool, half_written: int = 0) -> None:
    """What the running test observed; `passed` is its own verdict, and the test's end can still overturn it."""
    _PENDING.append(Outcome(kind, category, case, outcome, passed, half_written))


def _failure_line(call: Any) -> str:
    text = call.excinfo.exconly().strip() if call.excinfo is not None else "failed"
    line = text.splitlines()[0] if text else "failed"
    return line if len(line) <= 160 else line[:157] + "..."


def observe(item: Any, call: Any, report: Any) -> None:
    """Settle the running test's records once pytest has its teardown report."""
    if report.failed and item.nodeid not in _FAILURE:
        _FAILURE[item.nodeid] = f"{report.when} failed: {_failure_line(call)}"
    if report.when != "teardown":
        return
    failure = _FAILURE.pop(item.nodeid, None)
    claimed = list(_PENDING)
    _PENDING.clear()
    if failure is None:
        RECORDS.extend(claimed)
    elif claimed:
        RECORDS.extend(replace(r, passed=False, outcome=f"{r.outcome}; {failure}") for r in claimed)
    else:
        kind = KINDS.get(Path(str(item.fspath)).stem)
        if kind is not None:
            spec = getattr(item, "callspec", None)
            category = item.originalname.removeprefix("test_").replace("_", " ")
            RECORDS.append(Outcome(kind, category, spec.id if spec else item.name, failure, False, 0))


def render() -> str:
    by = defaultdict(list)
    for r in RECORDS:
        by[(r.kind, r.category)].append(r)
    lost = sum(r.half_written for r in RECORDS)
    failed = [r for r in RECORDS if not r.passed]
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Reliability: what the tests tried",
        "",
        "Written by the test suite (`make test`; tests/test_bad_input.py, tests/test_faults.py,",
        f"tests/test_fuzz.py) on {platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs,",
        f"Python {platform.python_version()}. Each row counts cases run and how they ended; a case counts",
        "as passed only when its test passed (tests/conftest.py settles each record from pytest's report).",
        "",
        "| kind | category | cases | passed | outcomes |",
        "|---|---|---|---|---|",
    ]
    for (kind, cat), rows in sorted(by.items()):
        outcomes: dict[str, int] = defaultdict(int)
        for r in rows:
            outcomes[r.outcome] += 1
        shown = ", ".join(f"{o} x{n}" for o, n in sorted(outcomes.items()))
        lines.append(f"| {kind} | {cat} | {len(rows)} | {sum(r.passed for r in rows)} | {shown} |")
    lines += [
        "",
        f"Cases: {len(RECORDS)}; passed: {len(RECORDS) - len(failed)}; failed: {len(failed)}.",
        f"Files lost or half-written: {lost}.",
        "",
    ]
    if failed:
        lines += ["## Failed cases", ""]
        lines += [f"- {r.kind} / {r.category}: {r.case} -> {r.outcome}" for r in failed]
        lines.append("")
    lines += ["## Cases (bad input and faults; fuzz cases are counted above)", ""]
    for r in RECORDS:
        if r.kind == "fuzz":
            continue
        lines.append(f"- {r.kind} / {r.category}: {r.case} -> {r.outcome}{'' if r.passed else ' (FAILED)'}")
    return "\n".join(lines) + "\n"
