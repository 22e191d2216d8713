"""The onnx-int4 export child seen from the parent: its output lines become progress steps.

The child runs through edgekit.childjob (job file, log, memory watch, result file); what is
particular to this child is how its tools' output is split into lines and read as steps.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...childjob import OFFLINE_ENV, ProgressSteps, keep_log, log_tail, spawn
from ...errors import OutOfMemory
from ...measure import ChildWatch
from ...progress import Progress

# Line ends, plus the start of each k_quant "Progress: [##  ] 18.18%" update, which
# neural-compressor prints without any line break until it finishes.
_LINE_BREAK = re.compile(rb"\r|\n|(?=Progress: \[)")
PHASE = "@@edgekit-phase "  # a line the child prints to name the step it is starting
COUNT = "@@edgekit-count "  # "done/total" of that step (ChildProgress), total 0 when unknown
CHILD_BOOT = (
    "import sys; from edgekit.formats.onnx_int4.children import child_main; sys.exit(child_main(*sys.argv[1:]))"
)


def run_child(job: dict[str, Any], work: Path, progress: Progress, output: ChildOutput) -> dict[str, Any]:
    """Run `job` in a fresh interpreter (cwd `work`); stream its output into the progress bars.
    Returns the child's result; a failed one carries its exit code, log tail and kept log."""
    steps = ProgressSteps(progress)
    steps.start("loading checkpoint")
    try:
        done = spawn(
            ["-c", CHILD_BOOT],
            job,
            work,
            f"the {job['engine']} child",
            on_line=lambda line: output.feed(line.strip(), steps),
            line_break=_LINE_BREAK,
            env=OFFLINE_ENV,
            cwd=work,
            watch=ChildWatch,
        )
    finally:
        steps.close()
    if done.out_of_memory:
        raise OutOfMemory(
            done.out_of_memory + "; nothing was published",
            "Use a machine with more RAM or close other programs; the gguf-q4_k_m target streams the checkpoint",
        )
    result: dict[str, Any] = done.result if done.result is not None else {"ok": False}
    if done.returncode != 0:
        result["ok"] = False
    if not result["ok"]:
        result.update(returncode=done.returncode, tail=log_tail(done.log), log=str(keep_log(done.log, "onnx-int4")))
    return result


class ChildOutput:
    """Turns the lines the builder, the quantizer and our child print into progress steps."""

    READING_LAYER = re.compile(r"^Reading layer (\d+)")
    QUANT_PERCENT = re.compile(r"Progress: \[[# ]*\]\s*([\d.]+)%")  # neural-compressor rtn/k_quant
    QUANT_NODE = re.compile(r"^start to quantize (?!model)")  # MLAS default quantizer, INFO log
    SAVING_TENSOR = re.compile(r"^Saving .*\|\s*(\d+)/(\d+)")  # tqdm bar of onnx_ir.save

    def __init__(self, num_layers: int | None):
        self.num_layers = num_layers

    def feed(self, line: str, steps: ProgressSteps) -> None:
        if not line:
            return
        if line.startswith(PHASE):
            steps.start(line[len(PHASE) :])
        elif line.startswith(COUNT):
            done, _, total = line[len(COUNT) :].partition("/")
            steps.update(float(done), float(total) or None)
        elif m := self.READING_LAYER.match(line):
            steps.start("converting layers", self.num_layers)
            steps.update(int(m.group(1)) + 1)
        elif line.startswith("Saving ONNX model"):
            steps.start("quantizing to int4")
        elif m := self.QUANT_PERCENT.search(line):
            steps.start("quantizing to int4")
            steps.update(float(m.group(1)), 100)
        elif self.QUANT_NODE.match(line):
            steps.start("quantizing to int4")
            steps.advance()
        elif m := self.SAVING_TENSOR.match(line):
            steps.start("writing model.onnx", int(m.group(2)))
            steps.update(int(m.group(1)), int(m.group(2)))
        elif line.startswith(("Saving GenAI config", "Saving processing files")):
            steps.start("writing config and tokenizer")


class _CountStep:
    def __init__(self, total: float | None):
        self.done, self.total = 0.0, total

    def advance(self, n: float = 1) -> None:
        self.update(self.done + n)

    def update(self, completed: float, total: float | None = None) -> None:
        self.done, self.total = completed, total if total is not None else self.total
        print(f"{COUNT}{self.done:g}/{self.total or 0:g}", flush=True)


class ChildProgress:
    """Progress for library code running inside the child (the imatrix and GPTQ calibration
    passes): a PHASE line per step and a COUNT line per advance, which ChildOutput turns into
    the parent's bars (with ETA on a terminal, a line every 30 s in a log)."""

    @contextmanager
    def step(self, name: str, total: float | None = None) -> Iterator[_CountStep]:
        print(PHASE + name, flush=True)
        yield _CountStep(total)

    def note(self, text: str) -> None:
        print(text, flush=True)
