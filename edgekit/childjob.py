"""The one child-process runner: a JSON job in, a fresh interpreter, a JSON result file out.

Bench, eval and format exports run their work in a child so that one model's memory
never counts against another's, the parent never imports a runtime, and a converter's
chatter stays out of the stdout `--json` owns. `spawn` is the whole protocol: it writes the
job, starts `python ARGS... JOB RESULT`, streams the child's output line by line (to a log
file and to `on_line`), watches the child's memory when handed a watch (a SIGKILL near the
limit is named OutOfMemory rather than a crash), and reads the result file if it was written.

Two ways to use it:
- `run` / `main` / `emit_mark`: a `python -m module JOB RESULT` child whose result is a dict
  or one-line error, with progress marks (`<mark> text`) on its output (bench, eval).
- `spawn` + `ProgressSteps` + `log_tail` / `keep_log`: a child whose output is parsed into
  progress steps and whose log is kept when it fails (a format's export child).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from .errors import BadInput, EdgekitError, GateFailed, IntegrityError, OutOfMemory, ToolFailed
from .fileio import write_text
from .progress import Progress, Step

_ERRORS: dict[int, type[EdgekitError]] = {2: BadInput, 3: GateFailed, 4: IntegrityError}
# Line ends as a terminal sees them: a tqdm bar redraws itself with a bare \r.
LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# Inputs are local directories: nothing in a child may reach the hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class MemoryWatch(Protocol):
    """What spawn needs of a memory watch (edgekit.measure.ChildWatch is one; this module sits
    below measure in the layers, so callers hand it in)."""

    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> Any: ...
    def out_of_memory(self, returncode: int | None, what: str) -> str | None: ...


@dataclass(frozen=True)
class ChildResult:
    """How a child ended: its exit code, the result file it wrote (None if none), its log."""

    returncode: int
    result: dict[str, Any] | None
    log: Path
    out_of_memory: str | None  # the one-line reason when the kernel killed it for memory


def package_root() -> str:
    """The directory holding the edgekit package, put first on the child's PYTHONPATH."""
    return str(Path(__file__).resolve().parent.parent)


def spawn(args: Sequence[str], job: dict[str, Any], work: Path, what: str, *, wrap: Sequence[str] = (),
          on_line: Callable[[str], None] | None = None, line_break: re.Pattern[bytes] = LINE_BREAK,
          env: Mapping[str, str] | None = None, cwd: Path | None = None,
          watch: Callable[[int], MemoryWatch] | None = None, capture: bool = True) -> ChildResult:
    """Run `[*wrap, python, *args, JOB, RESULT]` with job.json and result.json in `work`.

    Every byte the child prints (stdout and stderr) goes to work/child.log; each line (split
    by `line_break`, without its line end) goes to `on_line`. capture=False leaves the child
    on our stdout/stderr instead (its progress bars reach the terminal; the log stays empty).
    `env` is added to ours. An interrupt kills the child before it propagates: no converter
    is left running. `watch(pid)` (e.g. edgekit.measure.ChildWatch) samples its memory so
    that a SIGKILL near the limit comes back as `out_of_memory`, the reason naming `what`."""
    job_path, result_path, log_path = work / "job.json", work / "result.json", work / "child.log"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root(), os.environ.get("PYTHONPATH")]))
    cmd = [*wrap, sys.executable, *args, str(job_path), str(result_path)]
    out = subprocess.PIPE if capture else None
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if capture else None,
                            env=child_env, cwd=cwd)
    watcher = watch(proc.pid).__enter__() if watch else None
    try:
        with open(log_path, "wb") as log:
            pending = b""
            while proc.stdout is not None and (chunk := os.read(proc.stdout.fileno(), 65536)):
                log.write(chunk)
                pending += chunk
                *lines, pending = line_break.split(pending)
                for line in lines:
                    if on_line:
                        on_line(line.decode("utf-8", "replace"))
            if pending and on_line:
                on_line(pending.decode("utf-8", "replace"))
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave the child running
            proc.kill()
            proc.wait()
        if watcher is not None:
            watcher.__exit__(None, None, None)
    result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else None
    oom = watcher.out_of_memory(returncode, what) if watcher is not None else None
    return ChildResult(returncode, result, log_path, oom)


def log_tail(log_path: Path, n: int = 12) -> list[str]:
    """The last lines as a terminal would show them (a tqdm bar redraws with \\r). When the
    child reported a Python exception, the lines before its traceback: the error message
    already names the exception, the lines say what the tool was doing."""
    text = log_path.read_bytes().decode("utf-8", "replace")
    text = text.rsplit("Traceback (most recent call last):", 1)[0] or text
    lines = [ln.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for ln in text.split("\n")]
    return [ln for ln in lines if ln][-n:]


def keep_log(log_path: Path, name: str) -> Path:
    """A failed child's log, copied to the edgekit cache (its work directory is deleted)."""
    from .paths import cache_dir

    dest = cache_dir() / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log_path, dest)
    return dest


class ProgressSteps:
    """One open progress step at a time, switched as a child's output moves on."""

    def __init__(self, progress: Progress):
        self._progress = progress
        self._ctx: AbstractContextManager[Step] | None = None
        self._step: Step | None = None
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


def run(module: str, job: dict[str, Any], what: str, mark: str, wrap: Sequence[str] = (),
        on_mark: Callable[[str], None] | None = None,
        watch: Callable[[int], MemoryWatch] | None = None) -> tuple[dict[str, Any], str]:
    """Run `python -m module JOB RESULT` (prefixed by `wrap`, e.g. /usr/bin/time -v). Returns
    the child's result and what it printed (marks removed); an error result is raised as the
    EdgekitError of its exit code, a child killed for memory (with `watch`) as OutOfMemory.
    `what` names the process in messages."""
    output: list[str] = []

    def on_line(line: str) -> None:
        if line.startswith(mark):
            if on_mark:
                on_mark(line[len(mark):].strip())
        else:
            output.append(line + "\n")

    with tempfile.TemporaryDirectory(prefix="edgekit-child-") as tmp:
        done = spawn(["-m", module], job, Path(tmp), what, wrap=wrap, on_line=on_line, watch=watch)
    text = "".join(output)
    if done.result is None:
        if done.out_of_memory:
            raise OutOfMemory(done.out_of_memory, "Use a machine with more RAM or close other programs")
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
        raise ToolFailed(f"{what} died (exit {done.returncode}): {last.strip()}",
                         f"Rerun with EDGEKIT_DEBUG=1 python -m {module} to see its output")
    data = done.result
    if "error" in data:
        err = data["error"]
        raise _ERRORS.get(err.get("exit_code"), ToolFailed)(err["message"])
    return data, text


def main(argv: Sequence[str], work: Callable[[dict[str, Any]], dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> int:
    """The child's side: read the job, run `work`, write its result (or one-line error) atomically."""
    job_path, result_path = argv
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    try:
        result = work(job)
    except EdgekitError as e:
        result = {"error": {"exit_code": e.exit_code, "message": e.one_line()}}
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        if os.environ.get("EDGEKIT_DEBUG") == "1":
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        result = {"error": {"exit_code": 1, "message": f"{label(job)}: {type(e).__name__}: {first}"}}
    write_text(Path(result_path), json.dumps(result))
    return 1 if "error" in result else 0


def emit_mark(mark: str, text: str) -> None:
    print(f"{mark} {text}", file=sys.stderr, flush=True)
