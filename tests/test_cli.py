"""The CLI as a user drives it: help everywhere, JSON on stdout, one-line errors, nothing left behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_every_command_has_help_with_an_example_and_is_in_the_readme():
    readme = README.read_text()
    for name in cli.commands:
        result = invoke(name, "--help")
        assert result.exit_code == 0, name
        assert "Example:" in result.output, name
        assert f"edgekit {name}" in readme, f"README does not document `edgekit {name}`"


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and re.search(r"\d+\.\d+\.\d+", result.output)


def test_targets_json_is_one_document():
    result = CliRunner().invoke(cli, ["targets", "--json"])
    doc = json.loads(result.stdout)
    assert {"onnx-int4", "gguf-q4_k_m"} <= set(doc["formats"])
    assert doc["profiles"]["mobile-onnx"]["formats"] == ["onnx-int4"]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["export", "{tmp}/missing"], "no such directory"),
        (["export", "{tmp}/empty"], "has no config.json"),
        (["export", "{tmp}/empty", "--target", "tflite"], "unknown target 'tflite'"),
        (["export", "not-an-alias"], "not a directory, a hub id"),
        (["export", "phi3-mini", "--offline"], "not in the local Hugging Face cache"),
        (["export", "some-org/uncached-model", "--offline"], "pass a local checkpoint directory"),
        (["run", "{tmp}/empty", "--prompt", "hi"], "not an edgekit bundle"),
        (["run", "{tmp}/missing", "--prompt", "hi"], "no such bundle"),
        (["export", "{tmp}/empty", "--set", "nokey"], "not KEY=VALUE"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, expect):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "export":
        args += ["--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expect in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_usage_error_exit_code():
    result = CliRunner().invoke(cli, ["export", "--no-such-flag"])
    assert result.exit_code == 2


def test_debug_shows_the_exception(tmp_path):
    from edgekit.errors import BadInput

    with pytest.raises(BadInput):
        CliRunner().invoke(cli, ["--debug", "export", str(tmp_path / "missing")], catch_exceptions=False)


def test_help_is_fast_and_imports_no_runtime():
    import subprocess
    import sys

    code = (
        "import sys; from edgekit.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'llama_cpp', 'onnxruntime_genai') if m in sys.modules]\n"
        "print(heavy, file=sys.stderr); sys.exit(len(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
