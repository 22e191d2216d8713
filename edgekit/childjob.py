"""One measurement in a fresh interpreter: a JSON job in, a JSON result file out.

Used by bench and eval so that one model's memory never counts against another's and the
parent never imports a runtime. The child prints progress marks on its output
(`<mark> text`), which the parent passes to `on_mark`; everything else it prints is kept
for the error message if it dies without a result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import BadInput, EdgekitError, GateFailed, IntegrityError, ToolFailed

_ERRORS: dict[int, type[EdgekitError]] = {2: BadInput, 3: GateFailed, 4: IntegrityError}


def run(module: str, job: dict[str, Any], what: str, mark: str, wrap: Sequence[str] = (),
        on_mark: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """Run `python -m module JOB RESULT` (prefixed by `wrap`, e.g. /usr/bin/time -v). Returns
    the child's result and what it printed (marks removed); an error result is raised as the
    EdgekitError of its exit code. `what` names the process in messages."""
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="edgekit-child-") as tmp:
        job_path, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        cmd = [*wrap, sys.executable, "-m", module, str(job_path), str(result)]
        output: list[str] = []
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=env)
        try:
            for line in proc.stdout:
                if line.startswith(mark):
                    if on_mark:
                        on_mark(line[len(mark):].strip())
                else:
                    output.append(line)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = "".join(output)
        if not result.is_file():
            last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
            raise ToolFailed(f"{what} died (exit {rc}): {last.strip()}",
                             f"Rerun with EDGEKIT_DEBUG=1 python -m {module} to see its output")
        data = json.loads(result.read_text(encoding="utf-8"))
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
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, result_path)
    return 1 if "error" in result else 0


def emit_mark(mark: str, text: str) -> None:
    print(f"{mark} {text}", file=sys.stderr, flush=True)
