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

# Base methods whose search is worth skipping in the template. The builder's k-quant search of
# a 128k-row lm_head took minutes and GBs at 1B, for codes edgekit re-searches anyway.
EXPENSIVE_METHODS = ("k_quant",)
# What the template is quantized with instead: round-to-nearest with zero points. k_quant writes
# a zero point for every MatMul even when symmetric (the builder's naming table in
# builders/base.py make_tied_embeddings_init), symmetric RTN writes none, asymmetric RTN writes
# the same three inputs under the same names; tests/test_onnx_stream.py checks the bundle stays
# byte for byte the same.
CHEAP_TEMPLATE = {"algo_config": "rtn", "is_symmetric": "false"}

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


def template_options(
    extra_options: dict[str, str], weight_search: str, config: dict[str, Any]
) -> dict[str, str] | None:
    """The builder options of a cheaper template, or None to build it as the recipe says.

    Only the codes of MatMuls edgekit keeps (filling.TemplateCodesKept) reach the bundle; when
    edgekit re-searches every code, the template's search is wasted work. The int8 placement
    (last_matmul, mixed_layers, ...) shapes the graph, so it stays, as matmul_mixed_precision.
    A model that ties its embeddings gets the recipe's template: the builder shares the
    lm_head's codes with the embedding, edgekit keeps them (measured on SmolLM2-135M), so the
    cheap template would only be built to be rebuilt."""
    from .recipe import ALGORITHMS

    algorithm = extra_options.get("algo_config", "default")
    method, groups = ALGORITHMS.get(algorithm, (algorithm, ()))
    if weight_search not in ("edgekit", "imatrix", "gptq") or method not in EXPENSIVE_METHODS:
        return None
    # transformers' default when config.json does not say, as the builder reads it
    if (config.get("text_config") or config).get("tie_word_embeddings", True):
        return None
    cheap = {**extra_options, **CHEAP_TEMPLATE}
    if groups:
        cheap["matmul_mixed_precision"] = ",".join(f"{group}:int8" for group in groups)
    return cheap


def _build_template(job: dict[str, Any], template: Path, extra_options: dict[str, str]) -> None:
    from onnxruntime_genai.models.builder import check_extra_options, create_model

    from ...memory import release_memory
    from .childlog import PHASE
    from .templatequant import chunked_builder_k_quant

    shutil.rmtree(template, ignore_errors=True)
    template.mkdir(parents=True)
    opts = {**extra_options, "num_hidden_layers": str(TEMPLATE_LAYERS)}
    print(PHASE + f"building a {TEMPLATE_LAYERS}-layer template graph ({opts.get('algo_config')})", flush=True)
    check_extra_options(None, job["input"], str(template), "int4", "cpu", job["cache_dir"], opts)
    # the same codes as the builder's, searched a chunk of rows at a time: a 128k-row lm_head
    # searched whole took ~6 GiB (templatequant.py)
    with chunked_builder_k_quant():
        create_model(None, job["input"], str(template), "int4", "cpu", job["cache_dir"], **opts)
    # The builder's model, proto and quantized copies outlive create_model in reference cycles
    # until a collection: 4.4 GiB on a Llama-3.2-1B shape, still resident when the importance
    # matrix pass loaded its model on top (5.9 GiB); collected here, 0.4 GiB stays.
    release_memory()


def _stream(job: dict[str, Any]) -> dict[str, Any]:
    from .childlog import PHASE
    from .filling import TemplateCodesKept
    from .nodequant import load_imatrix

    template, out = Path(job["template"]), Path(job["output"])
    spec = job["requant"]
    n = num_layers(spec["config"])
    cheap = template_options(job["extra_options"], spec["weight_search"], spec["config"])
    _build_template(job, template, cheap or job["extra_options"])
    imatrix = load_imatrix(spec)
    try:
        return _fill(template, out, job, n, imatrix, final_codes=cheap is None)
    except TemplateCodesKept as e:
        # found before a byte of model.onnx.data was written: rebuild the template as the
        # recipe says, so the codes kept are the builder path's
        print(PHASE + f"{e}: rebuilding the template with {job['extra_options'].get('algo_config')}", flush=True)
        _build_template(job, template, job["extra_options"])
        return _fill(template, out, job, n, imatrix, final_codes=True)


def _fill(
    template: Path, out: Path, job: dict[str, Any], n: int, imatrix: Imatrix | None, final_codes: bool
) -> dict[str, Any]:
    from .childlog import PHASE
    from .nodequant import new_report

    spec = job["requant"]
    for p in sorted(template.iterdir()):
        if p.is_file() and not p.name.startswith("model.onnx"):
            shutil.copy2(p, out / p.name)
    genai = out / "genai_config.json"
    text = genai.read_text(encoding="utf-8")
    # a text edit, so the file stays byte for byte what the builder writes for n layers
    genai.write_text(re.sub(r'("num_hidden_layers":\s*)\d+', rf"\g<1>{n}", text), encoding="utf-8")
    report = new_report(spec, imatrix)
    print(PHASE + "re-quantizing weights (edgekit, streamed)", flush=True)
    write_streamed(template, out, spec, n, job["mixed_layers"], imatrix, report, final_codes)
    return report


def write_streamed(
    template: Path,
    out: Path,
    spec: dict[str, Any],
    n: int,
    mixed: bool,
    imatrix: Imatrix | None,
    report: dict[str, Any],
    final_codes: bool = True,
) -> None:
    """The N-layer bundle into `out`. final_codes: the template was quantized as the recipe
    says (else a node that keeps the builder's codes raises TemplateCodesKept)."""
    import onnx

    from .filling import Filler
    from .nodequant import LockedSource
    from .weights import CheckpointWeights

    model = onnx.load(str(template / "model.onnx"), load_external_data=False)
    graph = model.graph
    ckpt = Path(spec["checkpoint"])
    filler = Filler(template, graph, ckpt, final_codes)
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
