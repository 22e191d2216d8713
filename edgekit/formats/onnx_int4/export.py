"""onnx-int4 export orchestration: pick the engine, run its child, complete the bundle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ToolFailed, UnsupportedArchitecture
from .. import ExportCost, ExportNotes
from .architectures import BUILDER_EXCLUDED, FALLBACK_ARCHITECTURES, SUPPORTED_ARCHITECTURES
from .childlog import ChildOutput, run_child
from .files import complete_bundle_files, set_context_length, weight_notes, weight_summary, write_genai_config
from .mobile import make_mobile
from .recipe import ALGORITHMS, OnnxRecipe, builder_extra_options
from .rewrite import requant_job, requant_notes
from .stream import WHOLE_MODEL, streaming_notes, why_not_streamed

if TYPE_CHECKING:
    from ...checkpoint import Checkpoint
    from ...progress import Progress

# What preflight (edgekit.preflight) reserves for an export, fitted by benchmarks/preflight_fit.py
# on edgekit's streamed exports in benchmarks/results/scale.json (default recipe, importance
# matrix computed, process-tree peaks, 10 % headroom) at five shapes: SmolLM2-135M 1.79 GiB,
# Llama-3.2-1B 6.07 GiB (its tied 128k lm_head goes through the builder's 3-layer template in
# float32), Phi-3-mini 6.44 GiB, Phi-4-mini 12.60 GiB (its 200k-row tied embedding, 2.3 GiB in
# float32, held about four times by the template) and Phi-3-medium (14B) 14.49 GiB. The
# streamed path holds the template (3 layers + the big tables) and a few layers' tensors, so
# the peak follows the largest tensor and one layer (about ten float32 copies of it), not the
# model. Disk: the bundle and the template, fitted the same way.
# The whole-model path (a recipe that keeps the builder's quantization, the optimum exporter, an
# architecture outside the streaming table): the builder holds the model in float32 and its
# quantized copies; measured 2.65 GiB at SmolLM2-135M (benchmarks/results/onnx_memory.md), and at
# Llama-3.2-1B's shape (4.6 GiB fp32) 11.8 GiB for the raw builder's RTN and 20.6 GB for k-quant
# (docs/scale.md): 1600 MiB + 4.2 x fp32 MiB covers them.
PREFLIGHT_COST = ExportCost(
    # preflight_fit.py's least squares gave 1447 / 4.019 / 9.981, which put Llama-3.2-1B at 1.254x;
    # moved within the 1.0-1.25x band the test holds every point to (1.06-1.19x)
    ram_fixed_mb=1420,
    ram_per_largest=3.61,
    ram_per_layer=10.034,
    disk_fixed_mb=471,
    disk_per_fp32_byte=0.260,
    whole_ram_fixed_mb=1600,
    whole_ram_per_fp32_byte=4.2,
)

# A rebuild of the same checkpoint with the same tool versions reproduces every file of the
# bundle byte for byte. Measured on this machine: tiny Phi-3 (builder and optimum paths) and
# SmolLM2-135M (builder, 113 MB; optimum, 189 MB) built twice each, all sha256 equal. The
# builder names nodes and initializers deterministically and quantizes with plain numpy; the
# optimum path traces with torch.onnx, also deterministic on CPU. Not claimed across
# versions: a different onnxruntime or builder changes the bytes.


def export(checkpoint: Checkpoint, staging: Path, recipe: OnnxRecipe, progress: Progress) -> ExportNotes:
    """Write model.onnx, model.onnx.data, genai_config.json, tokenizer and chat template."""
    engine = choose_engine(checkpoint, recipe)
    notes: list[str] = []
    if clash := builder_lm_head_lookalikes(checkpoint.config):
        notes.append(
            f"{', '.join(clash)} has as many outputs as the vocabulary ({checkpoint.config.get('vocab_size')}): "
            "the genai builder would write it as an lm_head, so "
            + ("the optimum path was used" if engine == "optimum" else "expect the parity gate to fail")
        )
    requant: dict[str, Any] | None = None
    work = staging.parent / (staging.name + "-onnx-work")  # same disk; stale ones are swept by pid
    work.mkdir()
    try:
        if engine == "builder":
            try:
                requant = _run_builder(checkpoint, staging, work, recipe, progress)
            except _Unsupported as e:
                if recipe.engine == "builder" or checkpoint.architecture not in FALLBACK_ARCHITECTURES:
                    raise UnsupportedArchitecture(
                        f"the onnxruntime-genai builder cannot export {checkpoint.architecture}: {e}",
                        "Try --set engine=optimum, or the gguf-q4_k_m target",
                    ) from None
                notes.append(f"the genai builder refused this checkpoint ({e}); used the optimum fallback")
                _clear(staging)
                engine = "optimum"
        if engine == "optimum":
            requant = _run_optimum(checkpoint, staging, work, recipe, progress)
            write_genai_config(checkpoint, staging)
            notes.append(
                "exported with optimum + MatMulNBitsQuantizer (fallback path); genai_config.json written by edgekit"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    notes += complete_bundle_files(checkpoint, staging)
    context, context_note = set_context_length(checkpoint.config, staging / "genai_config.json", recipe.context_length)
    if context_note:
        notes.append(context_note)
    weights = weight_summary(staging / "model.onnx")
    notes += weight_notes(weights)
    if recipe.precision == "int4" and ALGORITHMS[recipe.algorithm][1] and not weights["matmul_int8"]:
        notes.append(
            f"algorithm {recipe.algorithm} raises some MatMuls to int8, but none matched "
            "in this graph: every quantized MatMul is int4"
        )
    path_taken = "genai-builder" if engine == "builder" else "optimum+MatMulNBits"
    quantization = {"path": path_taken, "weights": weights, "context_length": context}
    if engine == "builder":
        quantization["builder_extra_options"] = builder_extra_options(recipe, checkpoint.trust_remote_code)
        path = str((requant or {}).pop("path_taken", WHOLE_MODEL))
        quantization["path_taken"] = path
        notes += streaming_notes(requant, path)
    if requant:
        quantization["edgekit_requantization"] = requant
        notes += requant_notes(requant)
    unreproducible: tuple[str, ...] = ()
    if recipe.mobile:  # last: everything above reads model.onnx, which this may replace
        mobile = make_mobile(staging, progress)
        quantization.update(mobile.quantization)
        notes += mobile.notes
        unreproducible = mobile.unreproducible
    tools = tool_versions()
    if engine == "optimum":
        tools.update(package_versions("optimum", "optimum-onnx"))
    return ExportNotes(
        quantization=quantization,
        tools=tools,
        path_taken=path_taken,
        notes=tuple(notes),
        reproducible_files=tuple(
            sorted(p.name for p in staging.iterdir() if p.is_file() and p.name not in unreproducible)
        ),
    )


def builder_lm_head_lookalikes(config: dict[str, Any]) -> list[str]:
    """Projections the genai builder (0.15.2, base.py has_lm_head) would take for the lm_head:
    it treats every Linear whose out_features equals the vocabulary size as one, and writes
    it as a second lm_head mid-graph. No released model has such a width (Phi-3-mini's widest
    is 16384 against a 32064 vocabulary), small custom ones can: measured on a tiny Phi-4-mini
    shape whose fused qkv_proj had 512 outputs over a 512-token vocabulary, KLD 6.4."""
    cfg = config.get("text_config") or config
    vocab = cfg.get("vocab_size")
    heads = cfg.get("num_attention_heads")
    if not vocab or not heads or not cfg.get("hidden_size"):
        return []
    head = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv = cfg.get("num_key_value_heads") or heads
    inter = cfg.get("intermediate_size") or 0
    widths = {
        "q_proj": heads * head,
        "k_proj/v_proj": kv * head,
        "qkv_proj": (heads + 2 * kv) * head,
        "gate_proj/up_proj": inter,
        "gate_up_proj": 2 * inter,
        "o_proj/down_proj": cfg["hidden_size"],
    }
    return [name for name, width in widths.items() if width == vocab]


def config_problems(config: dict[str, Any]) -> list[str]:
    """Shapes the export tools mishandle, for tiny test checkpoints to avoid (edgekit.tiny)."""
    return [
        f"{name} has as many outputs as the vocabulary (the genai builder would take it for the lm_head)"
        for name in builder_lm_head_lookalikes(config)
    ]


def why_not_streamed_export(checkpoint: Checkpoint, recipe: OnnxRecipe) -> str | None:
    """None when the export takes the streamed path (PREFLIGHT_COST's main figures), else why it
    holds the whole model (the whole_ram figures). Raises nothing: an engine the checkpoint
    cannot take is refused later, by export itself."""
    try:
        engine = choose_engine(checkpoint, recipe)
    except UnsupportedArchitecture:
        return None
    if engine == "optimum":
        return "the optimum exporter holds the whole model"
    return why_not_streamed(checkpoint.architecture, checkpoint.config, recipe)


def choose_engine(checkpoint: Checkpoint, recipe: OnnxRecipe) -> str:
    arch = checkpoint.architecture
    clash = builder_lm_head_lookalikes(checkpoint.config)
    if clash and recipe.engine == "auto" and arch in FALLBACK_ARCHITECTURES:
        return "optimum"  # the builder's graph would be wrong; export() notes why
    if recipe.engine == "optimum" or (recipe.engine == "auto" and arch not in SUPPORTED_ARCHITECTURES):
        if arch not in FALLBACK_ARCHITECTURES:
            why = BUILDER_EXCLUDED.get(arch, "not in its architecture table")
            raise UnsupportedArchitecture(
                f"onnx-int4 cannot export {arch} (genai builder: {why}; optimum fallback: not supported)",
                "Try the gguf-q4_k_m target",
            )
        return "optimum"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"the onnxruntime-genai builder does not export {arch}", "Use --set engine=auto or engine=optimum"
        )
    return "builder"


class _Unsupported(Exception):
    """The builder raised NotImplementedError: it has no code path for this checkpoint."""


def _clear(directory: Path) -> None:
    for p in directory.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _num_layers(config: dict[str, Any]) -> int | None:
    cfg = config.get("text_config") or config
    return cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")


def _run_builder(
    checkpoint: Checkpoint, staging: Path, work: Path, recipe: OnnxRecipe, progress: Progress
) -> dict[str, Any] | None:
    job: dict[str, Any] = {
        "engine": "builder",
        "input": str(checkpoint.path),
        "output": str(staging),
        "cache_dir": str(work / "cache"),
        "extra_options": builder_extra_options(recipe, checkpoint.trust_remote_code),
        "precision": recipe.precision,
        "requant": requant_job(checkpoint, recipe),
    }
    if why_not_streamed(checkpoint.architecture, checkpoint.config, recipe) is None:
        job.update(
            engine="stream",
            template=str(work / "template"),
            mixed_layers="mixed_layers" in ALGORITHMS[recipe.algorithm][1],
        )
    result = run_child(job, work, progress, ChildOutput(_num_layers(checkpoint.config)))
    if result.get("error") == "NotImplementedError":
        raise _Unsupported(result.get("message", ""))
    _raise_on_failure(result, "the onnxruntime-genai model builder")
    return result.get("requant")


def _run_optimum(
    checkpoint: Checkpoint, staging: Path, work: Path, recipe: OnnxRecipe, progress: Progress
) -> dict[str, Any] | None:
    job = {
        "engine": "optimum",
        "input": str(checkpoint.path),
        "output": str(staging),
        "cache_dir": str(work / "cache"),
        "fp32_dir": str(work / "fp32"),
        "trust_remote_code": checkpoint.trust_remote_code,
        "recipe": {k: getattr(recipe, k) for k in OnnxRecipe.__dataclass_fields__},
        "requant": requant_job(checkpoint, recipe),
    }
    result = run_child(job, work, progress, ChildOutput(_num_layers(checkpoint.config)))
    _raise_on_failure(result, "optimum's ONNX export + MatMulNBitsQuantizer")
    return result.get("requant")


def _raise_on_failure(result: dict[str, Any], tool: str) -> None:
    if result.get("ok"):
        return
    tail = "\n".join(result.get("tail", []))
    raise ToolFailed(
        f"{tool} failed ({result.get('error', 'exit code ' + str(result.get('returncode')))}: "
        f"{result.get('message', '')})\n--- last lines of its output ---\n{tail}",
        f"Full log: {result['log']}",
    )


def tool_versions() -> dict[str, str]:
    """Versions that shape an onnx-int4 bundle (the optimum ones are added by export when used)."""
    return package_versions("onnxruntime", "onnxruntime-genai", "onnx", "onnx-ir", "transformers", "torch")


def package_versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for p in packages:
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            pass
    return found
