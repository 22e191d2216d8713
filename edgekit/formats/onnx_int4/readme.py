"""The README written into an onnx-int4 bundle: how to run it with onnxruntime-genai, without edgekit."""

from __future__ import annotations

from typing import Any

# The format's colour in report plots (matplotlib's tab:blue); each format keeps its own.
PLOT_COLOR = "#1f77b4"

# str.format fields: name, model, version, sha (edgekit.bundle_readme) and those of readme_fields.
README_TEMPLATE = """\
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



def readme_fields(manifest: dict[str, Any]) -> dict[str, str]:
    return {}
