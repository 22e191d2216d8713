"""The CLI's export / verify / run / validate / tune flows on the fake format (tests/fakeformat.py):
the real console script, real bundles, manifests, parity gates and exit codes, no runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakeformat import MODEL_FILE, NAME, fake_format  # noqa: F401 - the fixture, used by pytestmark

pytestmark = pytest.mark.usefixtures("fake_format")  # every test here runs with fake-int4 registered

EDGEKIT = str(Path(sys.executable).parent / "edgekit")  # the console script users run


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEKIT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_targets_lists_the_plugin_format_and_profile():
    r = cli("targets", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    text = json.dumps(doc)
    assert NAME in text and "fake-cpu" in text and "gguf-q4_k_m" in text  # layered on the shipped targets


def test_export_no_verify_validate_and_run(tiny_phi3, tmp_path):
    out = tmp_path / "b"
    r = cli("export", tiny_phi3, "--target", NAME, "--no-verify", "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == NAME and manifest["export"]["path_taken"] == "fake"
    assert manifest["quantization"] == {"seed": 0, "scale": 0.0, "bits": 4}
    assert manifest["parity"] is None
    names = {f["path"] for f in manifest["files"]}
    assert {MODEL_FILE, "tokenizer.json", "README.md"} <= names and "model.safetensors" not in names
    assert cli("validate", out).returncode == 0

    runs = [cli("run", out, "--prompt", "Hello", "--raw", "--max-tokens", "6", "--json") for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    first, second = (json.loads(r.stdout) for r in runs)
    assert first["text"] == second["text"] and first["generated_tokens"] <= 6  # deterministic session

    (out / MODEL_FILE).write_text("{}")  # a tampered bundle is refused before it is opened
    r = cli("run", out, "--prompt", "Hello")
    assert r.returncode == 4 and MODEL_FILE in r.stderr, r.stderr


def test_export_verifies_by_default_and_the_gate_decides_the_exit_code(tiny_phi3, tmp_path):
    # (The passing side: the tune and build tests below publish bundles that passed.)
    bad = cli("export", tiny_phi3, "--target", NAME, "--set", "scale=20", "--out", tmp_path / "bad", "-q")
    assert bad.returncode == 3, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("error: parity gate failed") and "kld_mean" in lines[-1], bad.stderr
    parity = json.loads((tmp_path / "bad" / "parity.json").read_text())
    assert parity["passed"] is False and parity["tokenizer_agreement"] == 1.0 and parity["chat_template_match"]

    # The same bundle passes once the thresholds are relaxed on the command line.
    again = cli("verify", tmp_path / "bad", "--max-kld", "1000", "--max-ppl-ratio", "1e30", "--json", "-q")
    assert again.returncode == 0, again.stderr


def test_tune_keeps_the_candidate_that_passes(tiny_phi3, tmp_path):
    r = cli("export", tiny_phi3, "--target", NAME, "--tune", "--out", tmp_path / "t", "-q")
    assert r.returncode == 0, r.stderr
    tune = json.loads((tmp_path / "t" / "manifest.json").read_text())["tune"]
    assert tune["chosen"] == "uniform (default)"
    assert [t["passed"] for t in tune["tried"]] == [False, True]


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["--set", "scale=loud"], 2, "'scale' must be float"),
        (["--set", "colour=1"], 2, "unknown key 'colour'"),
    ],
)
def test_bad_recipe_values_name_the_key(tiny_phi3, tmp_path, args, code, says):
    r = cli("export", tiny_phi3, "--target", NAME, "--no-verify", "--out", tmp_path / "x", *args)
    assert r.returncode == code and says in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
