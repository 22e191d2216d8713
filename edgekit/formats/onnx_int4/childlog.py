"""The onnx-int4 export child seen from the parent: run it, log its output, turn lines into steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ...errors import OutOfMemory
from ...measure import ChildWatch

# Line ends, plus the start of each k_quant "Progress: [##  ] 18.18%" update, which
# neural-compressor prints without any line break until it finishes.
_LINE_BREAK = re.compile(rb"\r|\n|(?=Progress: \[)")
PHASE = "@@edgekit-phase "  # a line the child prints to name the step it is starting
CHILD_BOOT = ("import sys; from edgekit.formats.onnx_int4.children import child_main; "
               "sys.exit(child_main(sys.argv[1]))")


def run_child(job: dict[str, Any], work: Path, progress, output: "ChildOutput") -> dict[str, Any]:
    """Run `job` in a fresh interpreter; stream its output into a log and the progress bars."""
    job_path, result_path, log_path = work / "job.json", work / "result.json", work / "export.log"
    job["result"] = str(result_path)
    job_path.write_text(json.dumps(job), encoding="utf-8")
    package_root = str(Path(__file__).resolve().parents[3])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        # Inputs are local directories: nothing in the child may reach the hub.
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    steps = _Steps(progress)
    proc = subprocess.Popen([sys.executable, "-c", CHILD_BOOT, str(job_path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=work)
    watch = ChildWatch(proc.pid).__enter__()
    try:
        steps.start("loading checkpoint")
        with open(log_path, "wb") as log:
            pending = b""
            while chunk := proc.stdout.read1(65536):
                log.write(chunk)
                pending += chunk
                *lines, pending = _LINE_BREAK.split(pending)
                for line in lines:
                    output.feed(line.decode("utf-8", "replace").strip(), steps)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave a converter running
            proc.kill()
            proc.wait()
        watch.__exit__(None, None, None)
        steps.close()
    if oom := watch.out_of_memory(returncode, f"the {job['engine']} child"):
        raise OutOfMemory(oom + "; nothing was published",
                          "Use a machine with more RAM or close other programs; the gguf-q4_k_m target streams the checkpoint")
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"ok": False}
    if returncode != 0:
        result["ok"] = False
    if not result["ok"]:
        result.update(returncode=returncode, tail=_log_tail(log_path), log=str(_keep_log(log_path)))
    return result


def _log_tail(log_path: Path, n: int = 12) -> list[str]:
    """The last lines as a terminal would show them (a tqdm bar redraws with \\r). When the
    child reported a Python exception, the lines before its traceback: the error message
    already names the exception, the lines say what the tool was doing."""
    text = log_path.read_bytes().decode("utf-8", "replace")
    text = text.rsplit("Traceback (most recent call last):", 1)[0] or text
    lines = [ln.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for ln in text.split("\n")]
    return [ln for ln in lines if ln][-n:]


def _keep_log(log_path: Path) -> Path:
    """The work dir is deleted; a failed export's log moves to the edgekit cache."""
    from ...paths import cache_dir

    dest = cache_dir() / "logs" / f"onnx-int4-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log_path, dest)
    return dest


class _Steps:
    """One open progress step at a time, switched as the child's output moves on."""

    def __init__(self, progress):
        self._progress = progress
        self._ctx = self._step = None
        self.name: str | None = None

    def start(self, name: str, total: float | None = None) -> None:
        if name != self.name:
            self.close()
            self._ctx = self._progress.step(name, total)
            self._step = self._ctx.__enter__()
            self.name = name

    def update(self, completed: float, total: float | None = None) -> None:
        if self._step is not None:
            self._step.update(completed, total)

    def advance(self) -> None:
        if self._step is not None:
            self._step.advance(1)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = self._step = self.name = None


class ChildOutput:
    """Turns the lines the builder, the quantizer and our child print into progress steps."""

    READING_LAYER = re.compile(r"^Reading layer (\d+)")
    QUANT_PERCENT = re.compile(r"Progress: \[[# ]*\]\s*([\d.]+)%")  # neural-compressor rtn/k_quant
    QUANT_NODE = re.compile(r"^start to quantize (?!model)")        # MLAS default quantizer, INFO log
    SAVING_TENSOR = re.compile(r"^Saving .*\|\s*(\d+)/(\d+)")         # tqdm bar of onnx_ir.save

    def __init__(self, num_layers: int | None):
        self.num_layers = num_layers

    def feed(self, line: str, steps: _Steps) -> None:
        if not line:
            return
        if line.startswith(PHASE):
            steps.start(line[len(PHASE):])
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
