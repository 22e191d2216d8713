"""eval -> manifest -> select on fake-int4 bundles (tests/fakeformat.py): the eval children open
the plugin format, results are stored in each manifest, `select --stored` reads them back and
exits 3 naming the nearest miss when nothing is feasible. No runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakeformat import NAME, fake_format  # noqa: F401 - the fixture, used by pytestmark

pytestmark = pytest.mark.usefixtures("fake_format")

EDGEKIT = str(Path(sys.executable).parent / "edgekit")
TASKS = [
    {
        "id": "raw",
        "prompt": "The capital of France is",
        "expected": "Paris",
        "match": "contains",
        "max_tokens": 4,
        "group": "g",
    },
    {
        "id": "mc",
        "prompt": "The capital of France is",
        "match": "choice",
        "choices": ["Paris", "Rome", "Oslo"],
        "expected": "Paris",
        "group": "g",
    },
]


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEKIT, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_eval_stores_results_and_select_reads_them(tiny_phi3, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    bundles = []
    for name, scale in (("flat", "0"), ("spiky", "20")):
        b = tmp_path / name
        r = cli("export", tiny_phi3, "--target", NAME, "--no-verify", "--set", f"scale={scale}", "--out", b, "-q")
        assert r.returncode == 0, r.stderr
        bundles.append(b)

    r = cli("eval", *bundles, "--tasks", tasks, "--profile", "fake-cpu", "--no-reference", "--json", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    text = json.dumps(doc)
    assert all(str(b) in text for b in bundles), text[:2000]
    for b in bundles:  # the summary lands in each manifest (what --stored reads)
        assert json.loads((b / "manifest.json").read_text()).get("eval"), b
        assert cli("validate", b).returncode == 0  # re-hashed after the manifest changed

    picked = cli("select", *bundles, "--stored", "--tasks", tasks, "--profile", "fake-cpu", "--json", "-q")
    assert picked.returncode == 0, picked.stderr[-2000:]
    choice = json.loads(picked.stdout)
    assert any(str(b) in json.dumps(choice) for b in bundles), choice

    none = cli("select", *bundles, "--stored", "--tasks", tasks, "--profile", "fake-cpu", "--max-size-mb", "0.000001")
    assert none.returncode == 3, none.stderr
    last = none.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "size" in last, none.stderr
