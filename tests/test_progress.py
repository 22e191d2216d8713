"""Progress on stderr: bars with ETA on a terminal, plain heartbeat lines in a CI log."""

from __future__ import annotations

import time

from edgekit.progress import RichProgress, _duration


def test_plain_lines_when_not_a_terminal(capsys):
    progress = RichProgress(heartbeat_s=0.1, terminal=False)
    with progress.step("quantizing tensors", total=4) as step:
        for _ in range(4):
            time.sleep(0.06)
            step.advance()
    with progress.step("loading checkpoint"):  # reports nothing itself: the heartbeat does
        time.sleep(0.35)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "quantizing tensors ..."
    assert any("quantizing tensors: " in ln and "ETA" in ln and "/4 (" in ln for ln in lines)
    assert lines.index("loading checkpoint ...") > 0
    beats = [ln for ln in lines if ln.startswith("loading checkpoint: ") and "elapsed" in ln]
    assert len(beats) >= 2
    assert lines[-1].startswith("loading checkpoint: done in")


def test_quiet_prints_nothing(capsys):
    with RichProgress(quiet=True, heartbeat_s=0.05, terminal=False).step("x", total=2) as step:
        time.sleep(0.12)
        step.advance()
    assert capsys.readouterr().err == ""


def test_durations():
    assert [_duration(s) for s in (4.4, 75, 3725)] == ["4s", "1m15s", "1h02m"]
