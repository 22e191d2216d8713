"""The README written into a gguf-q4_k_m bundle: how to run it with llama.cpp, without edgekit."""

from __future__ import annotations

from typing import Any

# The format's colour in report plots (matplotlib's tab:red); each format keeps its own.
PLOT_COLOR = "#d62728"

# What the hub files a GGUF repo under: its library filter for GGUF files is `gguf`
# (hf.co/models?library=gguf, hub-docs docs/hub/gguf.md).
LIBRARY_NAME = "gguf"
RUNTIME_TAG = "llama.cpp"

# str.format fields: name, model, version, sha, figures (edgekit.bundle_readme) and those of readme_fields.
README_TEMPLATE = """\
# {name}

{model} exported by edgekit {version} to GGUF ({quant}) for llama.cpp.
Checkpoint sha256: `{sha}`. Files and hashes: `manifest.json`.

## Measured

{figures}

## Run it without edgekit

llama-cpp-python:

```python
from llama_cpp import Llama
llm = Llama(model_path="model.gguf", n_ctx=4096, use_mmap=False)  # see below
out = llm.create_chat_completion(messages=[{{"role": "user", "content": "What is the capital of France?"}}])
print(out["choices"][0]["message"]["content"])
```

llama.cpp: `llama-cli -m model.gguf -cnv --no-mmap` (the chat template is stored in the GGUF
metadata). `--no-mmap` / `use_mmap=False`: on a CPU where llama.cpp repacks the weights (x86 with
AVX2, ARM) a memory-mapped model stays resident twice, mapped and repacked; edgekit measured its
peak RSS this way.

Ollama: `ollama create {name} -f Modelfile` in this directory, then `ollama run {name}`
(the Modelfile carries the chat template translated to Ollama's syntax and the stop tokens).

With edgekit: `edgekit run . --prompt "What is the capital of France?"`
"""


def _quant(manifest: dict[str, Any]) -> str:
    return str(manifest.get("quantization", {}).get("quant_type", "Q4_K_M"))


def readme_fields(manifest: dict[str, Any]) -> dict[str, str]:
    return {"quant": _quant(manifest)}


def card_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    # The quant type as recorded: a `--set quant_type=...` bundle is tagged with what it holds.
    return {"library_name": LIBRARY_NAME, "tags": ["gguf", _quant(manifest).lower(), RUNTIME_TAG]}
