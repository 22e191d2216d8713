"""onnx-int4 export that fits: the builder writes a 3-layer graph, edgekit writes the rest.

The genai builder holds the float model, its quantized copies and the whole ONNX proto at
once (OOM-killed at 23 GB on a Phi-3-mini-sized checkpoint). Its graph, though, is the same
for every decoder layer but the numbers in the names (expand.py). So the child runs the
builder with its own `num_hidden_layers` option set to TEMPLATE_LAYERS (transformers then
loads only those layers from the checkpoint, plus embeddings, final norm and lm_head), grows
that graph to N layers, and fills it tensor by tensor into model.onnx.data:

- tensors outside the cloned layers (embedding, rotary caches, final norm, lm_head when it
  keeps the builder's codes) are copied from the template, which the builder made from the
  real weights;
- each cloned layer's float tensors (norm weights, packed qkv biases) are read from the
  checkpoint by a rule learned on the template layers and checked there byte for byte;
- every MatMulNBits is re-quantized by edgekit (requantize_node) from the checkpoint
  tensor, on two threads, at most a few tensors in flight.

The file order is the builder path's (its kept tensors first, then the re-quantized ones in
node order), so the bundle is byte-identical to the builder path's; tests/test_onnx_stream.py
checks that on tiny models. Anything that breaks an assumption raises NotStreamable before a
byte is published, and export() then takes the builder path.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .expand import (
    TEMPLATE_LAYERS,
    NotStreamable,
    clone_named,
    clone_node,
    expand_sequence,
    layer_of,
    renamed,
    template_chooser,
)

if TYPE_CHECKING:
    from ...imatrix import Imatrix
    from .recipe import OnnxRecipe

# config.json architectures[0] -> why every decoder layer is built like one of the template's.
STREAMED_ARCHITECTURES: dict[str, str] = {
    # Llama 2/3.x, SmolLM2: identical layers; llama3 rope scaling lives in the global cos/sin caches.
    "LlamaForCausalLM": "identical layers",
    # Mistral: Llama's layers with one sliding window for all of them (an attribute, same in each).
    "MistralForCausalLM": "identical layers, one window",
    # Qwen2/2.5: q/k/v biases; the builder drops the Add of an all-zero bias, so each layer is
    # matched to a template layer with the same non-zero biases (template_chooser's signature).
    "Qwen2ForCausalLM": "identical layers up to which biases are non-zero",
    # Phi-3/3.5/4-mini, Phi-3-medium: fused qkv/gate_up; LongRoPE and partial rotary are in the
    # global caches and attributes.
    "Phi3ForCausalLM": "identical layers",
}

# Architectures the builder exports whose layers are not all alike: the builder path runs.
NOT_STREAMED: dict[str, str] = {
    "Gemma2ForCausalLM": "sliding and global attention layers alternate",
    "Gemma3ForCausalLM": "five sliding-window layers per global one, with their own rope bases",
    "SmolLM3ForCausalLM": "every fourth layer has no rotary embedding",
    "Lfm2ForCausalLM": "convolution and attention layers mixed",
    "GptOssForCausalLM": "sliding and full attention layers alternate",
}

# What the manifest's quantization.path_taken says.
STREAMED = f"streamed: builder template of {TEMPLATE_LAYERS} layers, tensors filled one by one"
WHOLE_MODEL = "whole model in the builder"


def why_not_streamed(architecture: str, config: dict[str, Any], recipe: OnnxRecipe) -> str | None:
    """None when export may take the streamed path, else the reason it does not."""
    cfg = config.get("text_config") or config
    layers = cfg.get("num_hidden_layers") or 0
    if recipe.precision != "int4" or recipe.weight_search == "builder":
        return "the recipe keeps the builder's own quantization"
    if architecture not in STREAMED_ARCHITECTURES:
        return NOT_STREAMED.get(architecture, f"{architecture} is not in the streaming table")
    if "text_config" in config:
        return "a multimodal config"
    if layers <= TEMPLATE_LAYERS:
        return f"{layers} layers: the builder's own graph is as small as the template"
    return None


def streaming_notes(report: dict[str, Any] | None, path_taken: str) -> list[str]:
    """Export notes on the path; takes the fallback's reason out of the report."""
    why = (report or {}).pop("not_streamed", None)
    if path_taken == STREAMED:
        return [
            f"streamed export: the builder wrote {TEMPLATE_LAYERS} layers, edgekit grew the graph "
            "and filled every tensor one at a time"
        ]
    return [f"streamed export not possible ({why}): the builder held the whole model"] if why else []


def num_layers(config: dict[str, Any]) -> int:
    return int((config.get("text_config") or config)["num_hidden_layers"])


# --- the child --------------------------------------------------------------------------------


def child_stream(job: dict[str, Any], whole_model: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Template graph from the builder, then the N-layer bundle in job["output"]. When the
    checkpoint breaks an assumption (NotStreamable), the output is cleared and
    whole_model(job), the builder path, runs instead; the report says which path was taken."""
    out = Path(job["output"])
    try:
        report = _stream(job)
        report["path_taken"] = STREAMED
    except NotStreamable as e:
        print(f"streamed export not possible ({e}); running the builder on the whole model", flush=True)
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        report = dict(whole_model(job) or {})
        report.update(path_taken=WHOLE_MODEL, not_streamed=str(e))
    finally:
        shutil.rmtree(job["template"], ignore_errors=True)
    return report


def _stream(job: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime_genai.models.builder import check_extra_options, create_model

    from .childlog import PHASE
    from .nodequant import load_imatrix, new_report

    template, out = Path(job["template"]), Path(job["output"])
    template.mkdir(parents=True, exist_ok=True)
    opts = {**job["extra_options"], "num_hidden_layers": str(TEMPLATE_LAYERS)}
    print(PHASE + f"building a {TEMPLATE_LAYERS}-layer template graph", flush=True)
    check_extra_options(None, job["input"], str(template), "int4", "cpu", job["cache_dir"], opts)
    create_model(None, job["input"], str(template), "int4", "cpu", job["cache_dir"], **opts)
    spec = job["requant"]
    n = num_layers(spec["config"])
    for p in sorted(template.iterdir()):
        if p.is_file() and not p.name.startswith("model.onnx"):
            shutil.copy2(p, out / p.name)
    genai = out / "genai_config.json"
    text = genai.read_text(encoding="utf-8")
    # a text edit, so the file stays byte for byte what the builder writes for n layers
    genai.write_text(re.sub(r'("num_hidden_layers":\s*)\d+', rf"\g<1>{n}", text), encoding="utf-8")
    imatrix = load_imatrix(spec)
    report = new_report(spec, imatrix)
    print(PHASE + "re-quantizing weights (edgekit, streamed)", flush=True)
    write_streamed(template, out, spec, n, job["mixed_layers"], imatrix, report)
    return report


def write_streamed(
    template: Path,
    out: Path,
    spec: dict[str, Any],
    n: int,
    mixed: bool,
    imatrix: Imatrix | None,
    report: dict[str, Any],
) -> None:
    import onnx

    from .filling import Filler
    from .nodequant import LockedSource
    from .weights import CheckpointWeights

    model = onnx.load(str(template / "model.onnx"), load_external_data=False)
    graph = model.graph
    ckpt = Path(spec["checkpoint"])
    filler = Filler(template, graph, ckpt)
    choose = template_chooser(n, mixed, filler.signature)
    parts = {}
    for field, clone in (
        ("node", clone_node),
        ("initializer", clone_named),
        ("input", clone_named),
        ("output", clone_named),
        ("value_info", clone_named),
    ):
        parts[field] = expand_sequence(list(getattr(graph, field)), lambda x: x.name, clone, n, choose)

    def template_name(name: str) -> tuple[str, bool]:
        """The template tensor an expanded one comes from, and whether it is a cloned layer's."""
        layer = layer_of(name)
        if layer is None or layer == 0:
            return name, False
        if layer == n:
            return renamed(name, {n: TEMPLATE_LAYERS}), False
        t = choose(layer)
        return renamed(name, {layer: t}), True

    source = LockedSource(CheckpointWeights(ckpt, spec.get("qkv_sizes")))
    filler.write(parts, template_name, source, spec, imatrix, report, out)
    for field in ("node", "initializer", "input", "output", "value_info"):
        graph.ClearField(field)
        getattr(graph, field).extend(parts[field])
    onnx.save_model(model, str(out / "model.onnx"))
