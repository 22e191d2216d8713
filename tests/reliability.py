"""Collects what the reliability tests tried, so docs/reliability.md is written by the tests
themselves (tests/conftest.py writes it at the end of a full run)."""

from __future__ import annotations

import platform
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


@dataclass(frozen=True)
class Outcome:
    kind: str          # "bad input", "fault", "fuzz"
    category: str
    case: str
    outcome: str
    passed: bool
    half_written: int  # files or directories left behind, half-written or modified


RECORDS: list[Outcome] = []


def record(kind: str, category: str, case: str, outcome: str, *, passed: bool, half_written: int = 0) -> None:
    RECORDS.append(Outcome(kind, category, case, outcome, passed, half_written))


def render() -> str:
    import os

    by = defaultdict(list)
    for r in RECORDS:
        by[(r.kind, r.category)].append(r)
    lost = sum(r.half_written for r in RECORDS)
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Reliability: what the tests tried",
        "",
        "Written by the test suite (`make test`; tests/test_bad_input.py, tests/test_faults.py,",
        f"tests/test_fuzz.py) on {platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs,",
        f"Python {platform.python_version()}. Each row counts cases run and how they ended.",
        "",
        "| kind | category | cases | passed | outcomes |",
        "|---|---|---|---|---|",
    ]
    for (kind, cat), rows in sorted(by.items()):
        outcomes = defaultdict(int)
        for r in rows:
            outcomes[r.outcome] += 1
        shown = ", ".join(f"{o} x{n}" for o, n in sorted(outcomes.items()))
        lines.append(f"| {kind} | {cat} | {len(rows)} | {sum(r.passed for r in rows)} | {shown} |")
    lines += ["", f"Cases: {len(RECORDS)}; passed: {sum(r.passed for r in RECORDS)}.",
              f"Files lost or half-written: {lost}.", "",
              "## Cases (bad input and faults; fuzz cases are counted above)", ""]
    for r in RECORDS:
        if r.kind == "fuzz":
            continue
        lines.append(f"- {r.kind} / {r.category}: {r.case} -> {r.outcome}{'' if r.passed else ' (FAILED)'}")
    return "\n".join(lines) + "\n"
