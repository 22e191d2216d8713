"""The "run it without edgekit" snippet in each bundle's README must run as written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the README snippets in plain onnxruntime-genai and llama.cpp


def _snippet(bundle):
    text = (bundle / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_onnx_readme_loop_runs_in_plain_onnxruntime_genai(tiny_onnx):
    code = _snippet(tiny_onnx).replace("max_length=256", "max_length=40")
    assert "apply_chat_template" in code and "import edgekit" not in code
    r = subprocess.run([sys.executable, "-c", code], cwd=tiny_onnx, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()  # the tiny random model says something
    readme = (tiny_onnx / "README.md").read_text()
    for name in ("Microsoft.ML.OnnxRuntimeGenAI", "ai.onnxruntime.genai", "OGAModel"):
        assert name in readme


def test_gguf_readme_snippet_runs_in_plain_llama_cpp(tiny_gguf):
    code = (
        _snippet(tiny_gguf)
        .replace("n_ctx=4096", "n_ctx=256, verbose=False")
        .replace("create_chat_completion(", "create_chat_completion(max_tokens=8, ")
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tiny_gguf, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ollama create" in (tiny_gguf / "README.md").read_text()
