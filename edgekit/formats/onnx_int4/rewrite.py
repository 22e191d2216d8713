"""edgekit re-quantization of a built graph's MatMulNBits nodes (runs in the export child)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .childlog import PHASE
from .embedquant import embedding_bits, embedding_report, plan_embedding, quantize_embedding
from .files import save_onnx
from .nodequant import LockedSource, NodeResult, count, load_imatrix, new_report, ordered_map, requantize_node
from .recipe import OnnxRecipe

if TYPE_CHECKING:
    import onnx

    from ...checkpoint import Checkpoint

# --- edgekit re-quantization -----------------------------------------------------------------
#
# The builder's quantizers (MLAS round-to-nearest, neural-compressor's rtn and k_quant) fit
# each block's scale and minimum in float and only then round the minimum to the integer zero
# point MatMulNBits stores, so the rounding they optimised is not the rounding the kernel
# does. requantize() re-searches every block against the error after the zero point is rounded
# (llama.cpp's make_qkx2-style search over 22 scale candidates plus a least-squares refit),
# optionally weighting each input column by the calibration imatrix (edgekit/imatrix.py), and
# applies int8_matmuls. Float weights come from the checkpoint (builder path; each matched
# tensor is checked against the node's own dequantized codes before it is used) or from the
# fp32 graph (optimum path). Nodes it cannot match keep the builder's codes, and the report
# says which. A fused qkv_proj whose q, k and v get different widths is split into one
# MatMulNBits per run of equal width, concatenated back into the fused output.

# (per node, on both cores: nodequant.py)


def requant_job(checkpoint: Checkpoint, recipe: OnnxRecipe) -> dict[str, Any] | None:
    """What the child needs to re-quantize, or None when the recipe keeps the builder's codes."""
    bits = embedding_bits(recipe)
    if recipe.precision != "int4" or (
        recipe.weight_search == "builder" and not recipe.int8_matmuls and not recipe.int8_block_size and not bits
    ):
        return None
    cfg = checkpoint.config.get("text_config") or checkpoint.config
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    qkv = [heads * head_dim, kv * head_dim, kv * head_dim] if heads and head_dim else None
    return {
        "weight_search": recipe.weight_search,
        "int8": list(recipe.int8_matmuls),
        "qkv_sizes": qkv,
        "int8_block_size": recipe.int8_block_size,
        "zero_points": recipe.zero_points,
        "embedding_bits": bits,  # None: the token embedding stays as the builder wrote it (embedquant.py)
        "embedding_block": recipe.block_size,
        "checkpoint": str(checkpoint.path),
        "config": checkpoint.config,
        "trust_remote_code": checkpoint.trust_remote_code,
    }


def requantize(model_or_path: onnx.ModelProto | str | Path, source: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Re-quantize the MatMulNBits nodes of a graph (a ModelProto, changed in place, or a
    model.onnx path, rewritten with its model.onnx.data). Returns a report for the manifest."""
    import onnx
    from onnx import numpy_helper

    path = None
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        model = onnx.load(str(path))
    else:
        model = model_or_path
    graph = model.graph
    imatrix = load_imatrix(spec)
    print(PHASE + "re-quantizing weights (edgekit)")
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    report = new_report(spec, imatrix)
    source = LockedSource(source)
    embedding, emb_kept, emb_proto = plan_embedding(list(graph.node), inits, uses, spec)
    if spec.get("embedding_bits"):
        report["embedding"] = embedding_report(
            embedding, emb_proto, spec["embedding_bits"], spec["embedding_block"], emb_kept
        )
    if emb_kept:
        embedding = None

    def one(node):
        if node is embedding:
            table = numpy_helper.to_array(emb_proto)
            return quantize_embedding(
                node, emb_proto, lambda r0, r1: table[r0:r1], spec["embedding_bits"], spec["embedding_block"]
            )
        if node.op_type != "MatMulNBits":
            return NodeResult((node,))
        return requantize_node(
            node, inits.get, uses, source, spec, imatrix, lambda name: numpy_helper.to_array(inits[name])
        )

    new_nodes: list[Any] = []
    add: list[Any] = []
    drop: set[str] = set()
    for node, result in zip(list(graph.node), ordered_map(one, list(graph.node))):
        if node is not embedding:
            count(report, node, result)
        new_nodes += result.nodes
        drop.update(result.drop)
        add += [numpy_helper.from_array(a, name) for name, a in result.tensors]
    kept_inits = [t for t in graph.initializer if t.name not in drop]
    graph.ClearField("initializer")
    graph.initializer.extend(kept_inits + add)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    if path is not None:
        save_onnx(model, path)
    return report


def requant_notes(report: dict[str, Any]) -> list[str]:
    notes = [
        f"edgekit re-quantized {report['requantized']} MatMuls (weight_search={report['weight_search']}"
        + (f", int8: {', '.join(report['int8_matmuls'])}" if report["int8_matmuls"] else "")
        + (
            f", int4 float minimums ({report['zero_points']})"
            if report.get("zero_points", "integer") != "integer"
            else ""
        )
        + ")"
    ]
    if report["split"]:
        notes.append(f"{report['split']} fused qkv MatMuls split by width and concatenated")
    if report["kept"]:
        notes.append(f"{len(report['kept'])} MatMuls kept the quantizer's codes ({report['kept'][0]})")
    emb = report.get("embedding")
    if emb and emb.get("bits"):
        notes.append(
            f"token embedding quantized by edgekit: int{emb['bits']} GatherBlockQuantized, blocks of {emb['block_size']}"
        )
    elif emb:
        notes.append(f"token embedding left as built: {emb['kept']}")
    if report.get("imatrix_missing"):
        notes.append(f"{len(report['imatrix_missing'])} MatMuls found no imatrix entry and were searched unweighted")
    return notes
