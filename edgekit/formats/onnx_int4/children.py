"""Entry points of the onnx-int4 export child: the genai builder or optimum + MatMulNBitsQuantizer."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...fileio import write_text
from .childlog import PHASE
from .expand import more_bits_layers as _more_bits_layers
from .files import save_onnx
from .recipe import ALGORITHMS
from .requant import LAYER_MATMUL
from .rewrite import requantize
from .stream import child_stream
from .weights import CheckpointWeights, OnnxWeights

if TYPE_CHECKING:
    import onnx


def child_main(job_path: str, result_path: str) -> int:
    """Entry point of the child interpreter. Writes {"ok", "error", "message"} to result_path."""
    import logging
    import traceback

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
    # Per-node lines from the default quantizer give the quantizing step a counter.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.INFO)
    try:
        report = {"builder": _child_builder, "optimum": _child_optimum, "stream": _child_stream}[job["engine"]](job)
        result: dict[str, Any] = {"ok": True, "requant": report}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises ToolFailed
        traceback.print_exc(file=sys.stdout)
        result = {"ok": False, "error": type(e).__name__, "message": str(e)[:2000]}
    write_text(Path(result_path), json.dumps(result))
    sys.stdout.flush()
    return 0 if result["ok"] else 1


def _child_builder(job: dict[str, Any]) -> dict[str, Any] | None:
    from onnxruntime_genai.models.builder import check_extra_options, create_model

    opts = dict(job["extra_options"])
    # check_extra_options converts the strings to typed values and loads the HF config into
    # opts["hf_details"], which create_model requires: the same two calls the CLI makes.
    precision = job.get("precision", "int4")
    check_extra_options(None, job["input"], job["output"], precision, "cpu", job["cache_dir"], opts)
    create_model(None, job["input"], job["output"], precision, "cpu", job["cache_dir"], **opts)
    if job.get("requant") and precision == "int4":
        source = CheckpointWeights(Path(job["input"]), job["requant"]["qkv_sizes"])
        return requantize(Path(job["output"]) / "model.onnx", source, job["requant"])
    return None


def _child_stream(job: dict[str, Any]) -> dict[str, Any]:
    """The streamed path (stream.py); the whole-model builder path when it does not apply."""
    return child_stream(job, _child_builder)


def _child_optimum(job: dict[str, Any]) -> dict[str, Any] | None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from optimum.exporters.onnx import main_export

    fp32, out = Path(job["fp32_dir"]), Path(job["output"])
    print(PHASE + "exporting to ONNX (optimum)")
    main_export(
        job["input"],
        output=fp32,
        task="text-generation-with-past",
        device="cpu",
        trust_remote_code=job["trust_remote_code"],
        local_files_only=True,
        do_validation=False,
        cache_dir=job["cache_dir"],
    )
    model = onnx.load(str(fp32 / "model.onnx"))
    if job["recipe"].get("precision", "int4") == "int4":
        print(PHASE + "quantizing to int4")
        quantizer = MatMulNBitsQuantizer(model, **fallback_quantizer_args(job["recipe"], model))
        quantizer.process()
        model = quantizer.model.model
    report = None
    if job.get("requant") and job["recipe"].get("precision", "int4") == "int4":
        report = requantize(model, OnnxWeights(fp32 / "model.onnx"), job["requant"])
    print(PHASE + "writing model.onnx")
    save_onnx(model, out / "model.onnx")
    # optimum copies tokenizer, chat template and generation config beside its model.onnx.
    for p in fp32.iterdir():
        if p.is_file() and not p.name.startswith("model.onnx") and p.name != "config.json":
            shutil.copy2(p, out / p.name)
    return report


def fallback_quantizer_args(recipe: dict[str, Any], model: onnx.ModelProto) -> dict[str, Any]:
    """MatMulNBitsQuantizer arguments for an optimum graph, meaning what the recipe means to
    the builder. The int8 groups are found by name in optimum's (torch module path) graph."""
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig, RTNWeightOnlyQuantConfig

    method, groups = ALGORITHMS[recipe["algorithm"]]
    names = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    head = lm_head_matmul(model)
    exclude = [head] if recipe["float_lm_head"] and head else []
    int8 = {n: {"bits": 8} for n in _int8_matmuls(groups, names, head) if n not in exclude}
    configs = {"rtn": RTNWeightOnlyQuantConfig, "k_quant": KQuantWeightOnlyQuantConfig}
    algo = configs[method](customized_weight_config=int8) if method in configs else None
    return dict(
        bits=4,
        block_size=recipe["block_size"],
        is_symmetric=recipe["is_symmetric"],
        accuracy_level=recipe["accuracy_level"],
        nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul",),  # a quantized embedding is edgekit's (embedquant.py)
        algo_config=algo,
    )


def lm_head_matmul(model: onnx.ModelProto) -> str | None:
    """The MatMul that produces the logits (lm_head in Llama-style graphs, embed_out in GPT-NeoX)."""
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    head = next((n.name for n in matmuls if "logits" in n.output), None)
    return head or next((n.name for n in matmuls if n.name == "/lm_head/MatMul"), None)


# The builder raises qkv_proj (it fuses q/k/v) and down_proj; optimum keeps q/k/v apart.
_MORE_BITS_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "down_proj")


def _int8_matmuls(groups: Sequence[str], names: Sequence[str], head: str | None) -> list[str]:
    picked = [head] if "last_matmul" in groups and head else []
    if "mixed_layers" in groups:
        layers = {int(m.group(1)) for n in names if (m := LAYER_MATMUL.match(n))}
        upgrade = _more_bits_layers(max(layers) + 1) if layers else set()
        for n in names:
            m = LAYER_MATMUL.match(n)
            if m and int(m.group(1)) in upgrade and m.group(2) in _MORE_BITS_PROJECTIONS:
                picked.append(n)
    return picked
