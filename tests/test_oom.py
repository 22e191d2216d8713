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
