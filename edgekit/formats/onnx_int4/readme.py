"""The README written into an onnx-int4 bundle: how to run it with onnxruntime-genai, without edgekit
(Python; and Android and iOS when the recipe built it for phones)."""

from __future__ import annotations

from typing import Any

# The format's colour in report plots (matplotlib's tab:blue); each format keeps its own.
PLOT_COLOR = "#1f77b4"

# What the hub files an ONNX repo under: ONNX is one of the file formats the hub knows itself
# (hf.co/models?library=onnx); onnxruntime-genai is not a hub library key
# (huggingface.js packages/tasks/src/model-libraries.ts), so it goes in the tags.
LIBRARY_NAME = "onnx"
RUNTIME_TAG = "onnxruntime-genai"

# str.format fields: name, model, version, sha, figures (edgekit.bundle_readme) and those of readme_fields.
README_TEMPLATE = """\
# {name}

{model} exported by edgekit {version} to ONNX {precision} for onnxruntime-genai.
Checkpoint sha256: `{sha}`. Files and hashes: `manifest.json`.

## Measured

{figures}

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

{phones}With edgekit: `edgekit run . --prompt "What is the capital of France?"`
"""

# Every bundle: the same loop exists in ORT GenAI's other language packages.
OTHER_LANGUAGES = """\
Mobile and other languages use the same loop through ORT GenAI's packages:
C# `Microsoft.ML.OnnxRuntimeGenAI` (`Model`, `Tokenizer`, `Generator`),
Java `ai.onnxruntime.genai` (`Model`, `Tokenizer`, `Generator`),
Objective-C `OGAModel`, `OGATokenizer`, `OGAGenerator`.

"""

# A bundle built for phones (recipe key `mobile`): the loop in each phone's package, at the
# versions the bundle was exported with. Names and coordinates as onnxruntime-genai 0.15 ships
# them: src/java (ai.onnxruntime.genai; Maven com.microsoft.onnxruntime:onnxruntime-genai-android,
# whose POM does not pull onnxruntime-android in) and src/objectivec/include/ort_genai_objc.h
# (pod onnxruntime-genai-objc, which has no chat-template call). str.format fields: genai, ort, name.
PHONES = """\
## Run it on a phone

This bundle was built for phones. The runtime opens the model by path, so ship this directory
with the app and open it where it lies on the device (on Android, copy it out of the APK's
assets into `filesDir` first). Versions are the ones this bundle was exported and checked with.

Android (Kotlin), `build.gradle.kts`:

```kotlin
dependencies {{
    implementation("com.microsoft.onnxruntime:onnxruntime-android:{ort}")
    implementation("com.microsoft.onnxruntime:onnxruntime-genai-android:{genai}")
}}
```

```kotlin
import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer

val model = Model(modelDir)  // this directory on the device
val tokenizer = Tokenizer(model)
val stream = tokenizer.createStream()
val params = GeneratorParams(model).apply {{ setSearchOption("max_length", 256.0) }}
val generator = Generator(model, params)
val messages = \"\"\"[{{"role": "user", "content": "What is the capital of France?"}}]\"\"\"
val prompt = tokenizer.applyChatTemplate("", messages, null, true)  // "": the bundle's own template
tokenizer.encode(prompt).use {{ generator.appendTokenSequences(it) }}
while (!generator.isDone()) {{
    generator.generateNextToken()
    print(stream.decode(generator.getLastTokenInSequence(0)))
}}
listOf(generator, params, stream, tokenizer, model).forEach {{ it.close() }}
```

iOS (Objective-C), `Podfile`: `pod 'onnxruntime-genai-objc', '{genai}'`; add this directory to the
app as a folder reference named `{name}`.

```objc
#import "ort_genai_objc.h"

NSError* error = nil;  // check it after every call
NSString* modelDir = [[NSBundle mainBundle] pathForResource:@"{name}" ofType:nil];
OGAModel* model = [[OGAModel alloc] initWithPath:modelDir error:&error];
OGATokenizer* tokenizer = [[OGATokenizer alloc] initWithModel:model error:&error];
OGATokenizerStream* stream = [[OGATokenizerStream alloc] initWithTokenizer:tokenizer error:&error];
OGAGeneratorParams* params = [[OGAGeneratorParams alloc] initWithModel:model error:&error];
[params setSearchOption:@"max_length" doubleValue:256 error:&error];
OGAGenerator* generator = [[OGAGenerator alloc] initWithModel:model params:params error:&error];
// This API has no chat-template call: lay the conversation out as the chat_template
// in tokenizer_config.json does (the Python loop above prints it with print(prompt)).
NSString* prompt = @"...";
[generator appendTokenSequences:[tokenizer encode:prompt error:&error] error:&error];
while (![generator isDoneWithError:&error]) {{
    [generator generateNextTokenWithError:&error];
    size_t count = [generator sequenceCountAtIndex:0 error:&error];
    const int32_t* tokens = [generator sequenceDataAtIndex:0 error:&error];
    NSLog(@"%@", [stream decode:tokens[count - 1] error:&error]);
}}
```

C# uses the same loop through `Microsoft.ML.OnnxRuntimeGenAI` (`Model`, `Tokenizer`, `Generator`).

"""

# A version the manifest does not record is named as missing, not filled in.
UNRECORDED = "VERSION-NOT-RECORDED"


def readme_fields(manifest: dict[str, Any]) -> dict[str, str]:
    q = manifest.get("quantization", {})
    fields = {"precision": str(q.get("precision", "int4"))}
    if not q.get("mobile"):
        return {**fields, "phones": OTHER_LANGUAGES}
    tools = manifest.get("tools", {})
    phones = PHONES.format(
        genai=tools.get("onnxruntime-genai", UNRECORDED),
        ort=tools.get("onnxruntime", UNRECORDED),
        name=manifest.get("name", "model"),
    )
    return {**fields, "phones": phones}


def card_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    precision = str(manifest.get("quantization", {}).get("precision", "int4"))  # int4, or fp32 baselines
    return {"library_name": LIBRARY_NAME, "tags": ["onnx", precision, RUNTIME_TAG]}
