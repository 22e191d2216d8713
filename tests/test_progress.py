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


def test_child_calibration_passes_reach_the_parents_bars(capsys):
    """ChildProgress (inside the onnx export child: the imatrix and GPTQ passes) prints a phase
    line and counted lines; the parent's ChildOutput turns them into its steps, with totals, so
    a 3B pass has a bar with ETA and not only a name."""
    from edgekit.childjob import ProgressSteps
    from edgekit.formats.onnx_int4.childlog import ChildOutput, ChildProgress

    with ChildProgress().step("imatrix: calibration text, block by block", total=3) as step:
        for _ in range(3):
            step.advance()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "@@edgekit-phase imatrix: calibration text, block by block"
    assert out[1:] == ["@@edgekit-count 1/3", "@@edgekit-count 2/3", "@@edgekit-count 3/3"]

    seen: list = []

    class Record:
        def step(self, name, total=None):
            from contextlib import contextmanager

            @contextmanager
            def ctx():
                class S:
                    def advance(self, n=1):
                        seen.append((name, "advance", n))

                    def update(self, completed, total=None):
                        seen.append((name, completed, total))

                yield S()

            return ctx()

        def note(self, text):
            pass

    steps = ProgressSteps(Record())
    reader = ChildOutput(num_layers=3)
    for line in out:
        reader.feed(line, steps)
    steps.close()
    assert seen == [("imatrix: calibration text, block by block", float(i), 3.0) for i in (1, 2, 3)]
