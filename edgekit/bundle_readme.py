"""The short README written into every bundle: how to run it with the plain runtime."""

from __future__ import annotations

from typing import Any

_GGUF = """\
# {name}

{model} exported by edgekit {version} to GGUF ({quant}) for llama.cpp.
Checkpoint sha256: `{sha}`. Files and hashes: `manifest.json`.

## Run it without edgekit

llama-cpp-python:

```python
from llama_cpp import Llama
llm = Llama(model_path="model.gguf", n_ctx=4096)
out = llm.create_chat_completion(messages=[{{"role": "user", "content": "What is the capital of France?"}}])
print(out["choices"][0]["message"]["content"])
```

llama.cpp: `llama-cli -m model.gguf -cnv` (the chat template is stored in the GGUF metadata).

Ollama: `ollama create {name} -f Modelfile` in this directory, then `ollama run {name}`
(the Modelfile carries the chat template translated to Ollama's syntax and the stop tokens).

With edgekit: `edgekit run . --prompt "What is the capital of France?"`
"""

_ONNX = """\
# {name}

{model} exported by edgekit {version} to ONNX int4 for onnxruntime-genai.
Checkpoint sha256: `{sha}`. Files and hashes: `manifest.json`.

## Run it without edgekit

Python (`pip install onnxruntime-genai`):

```python
import json
import onnxruntime_genai as og
model = og.Model(".")
tokenizer = og.Tokenizer(model)
stream = tokenizer.create_stream()
params = og.GeneratorParams(model)
params.set_search_options(max_length=256)
generator = og.Generator(model, params)
messages = [{{"role": "user", "content": "What is the capital of France?"}}]
prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
generator.append_tokens(tokenizer.encode(prompt))
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
```

Mobile and other languages use the same loop through ORT GenAI's packages:
C# `Microsoft.ML.OnnxRuntimeGenAI` (`Model`, `Tokenizer`, `Generator`),
Java `ai.onnxruntime.genai` (`Model`, `Tokenizer`, `Generator`),
Objective-C `OGAModel`, `OGATokenizer`, `OGAGenerator`.

With edgekit: `edgekit run . --prompt "What is the capital of France?"`
"""


def render(name: str, manifest: dict[str, Any]) -> str:
    source = manifest.get("source", {})
    fields = {
        "name": name,
        "model": source.get("alias") or source.get("hub_id") or source.get("requested"),
        "version": manifest.get("edgekit_version"),
        "sha": source.get("content_sha256", "")[:16],
        "quant": manifest.get("quantization", {}).get("quant_type", "Q4_K_M"),
    }
    template = _GGUF if manifest["format"].startswith("gguf") else _ONNX
    return template.format(**fields)
