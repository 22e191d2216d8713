"""A child killed by the kernel while memory was nearly gone is named for what killed it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from edgekit.measure import ChildWatch

HOG = "import time; x = bytearray(200 * 2**20); time.sleep(30)"


def _hog_killed(limit_mb: str, monkeypatch) -> tuple[ChildWatch, int]:
    monkeypatch.setenv("EDGEKIT_MEMORY_LIMIT_MB", limit_mb)
    proc = subprocess.Popen([sys.executable, "-c", HOG])
    with ChildWatch(proc.pid, interval=0.05) as watch:
        deadline = time.time() + 20
        while watch.peak_bytes < 200 * 2**20 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
    return watch, rc


def test_sigkill_near_the_limit_is_out_of_memory(monkeypatch):
    watch, rc = _hog_killed("240", monkeypatch)      # 200 MiB of 240: near
    message = watch.out_of_memory(rc, "the converter")
    assert message and message.startswith("out of memory: the converter reached 0.2 GiB of 0.2 GiB")
    assert "\n" not in message


def test_sigkill_far_from_the_limit_is_not(monkeypatch):
    watch, rc = _hog_killed("100000", monkeypatch)
    assert watch.out_of_memory(rc, "the converter") is None
    assert watch.out_of_memory(1, "the converter") is None   # an ordinary failure


@pytest.mark.slow
def test_export_names_an_oom_kill_and_publishes_nothing(tiny_phi3, tmp_path):
    """The GGUF converter, SIGKILLed while the pretend host limit is exceeded: exit 1, one
    line naming memory, no bundle."""
    out = tmp_path / "bundle"
    env = {**os.environ, "EDGEKIT_MEMORY_LIMIT_MB": "64"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "edgekit"), "export", str(tiny_phi3), "--target",
                             "gguf-q4_k_m", "--no-verify", "-q", "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def kill_converter():
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if any("convert_hf_to_gguf.py" in part for part in child.cmdline()):
                        time.sleep(0.5)
                        child.send_signal(signal.SIGKILL)
                        return
                except psutil.Error:
                    pass
            time.sleep(0.05)

    killer = threading.Thread(target=kill_converter)
    killer.start()
    _, stderr = proc.communicate(timeout=300)
    killer.join()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("error: out of memory: convert_hf_to_gguf.py reached"), stderr
    assert "nothing was published" in lines[0] and "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "bundle"]


# --- the shared child runner (edgekit.childjob.spawn) -------------------------------------------

CHILD = """import json, os, signal, sys, time
job = json.load(open(sys.argv[1]))
print("first line\\rredrawn", flush=True)
if job["hog"]:
    x = bytearray(200 * 2**20)
    time.sleep(1.5)                      # long enough for the watch to see it
    os.kill(os.getpid(), signal.SIGKILL)
open(sys.argv[2], "w").write(json.dumps({"got": job["n"] + 1}))
"""


def test_spawn_streams_lines_and_reads_the_result(tmp_path):
    from edgekit.childjob import spawn

    lines: list[str] = []
    done = spawn(["-c", CHILD], {"hog": False, "n": 41}, tmp_path, "the test child", on_line=lines.append,
                 watch=ChildWatch)
    assert done.returncode == 0 and done.result == {"got": 42} and done.out_of_memory is None
    assert lines[:2] == ["first line", "redrawn"]      # a bare \r ends a line, as a terminal shows it
    assert done.log.read_bytes().startswith(b"first line\rredrawn")
    # uncaptured (a child drawing its own progress on our terminal): the result still comes back
    shown = spawn(["-c", CHILD], {"hog": False, "n": 1}, tmp_path, "the test child", on_line=lines.append, capture=False)
    assert shown.result == {"got": 2} and len(lines) == 2 and shown.log.read_bytes() == b""


def test_spawn_names_a_child_killed_near_the_memory_limit(tmp_path, monkeypatch):
    from edgekit.childjob import spawn

    monkeypatch.setenv("EDGEKIT_MEMORY_LIMIT_MB", "240")
    done = spawn(["-c", CHILD], {"hog": True, "n": 0}, tmp_path, "the test child", watch=ChildWatch)
    assert done.returncode == -signal.SIGKILL and done.result is None
    assert done.out_of_memory and done.out_of_memory.startswith("out of memory: the test child reached")
    unwatched = spawn(["-c", CHILD], {"hog": True, "n": 0}, tmp_path, "the test child")
    assert unwatched.returncode == -signal.SIGKILL and unwatched.out_of_memory is None
