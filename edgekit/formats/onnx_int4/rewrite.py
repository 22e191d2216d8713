"""edgekit re-quantization of a built graph's MatMulNBits nodes (runs in the export child)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .childlog import PHASE
from .files import save_onnx
from .recipe import OnnxRecipe
from .requant import dequantize_matmulnbits, pack_matmulnbits, plan, quantize_blocks

if TYPE_CHECKING:
    import onnx

    from ...checkpoint import Checkpoint
    from .weights import CheckpointWeights, OnnxWeights

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

_NODE_BASE = re.compile(r"^(.*/MatMul)(?:_Q\d+)?$")
_MISMATCH = 0.3  # relative RMS difference above which a checkpoint tensor is not this node's weight


def requant_job(checkpoint: Checkpoint, recipe: OnnxRecipe) -> dict[str, Any] | None:
    """What the child needs to re-quantize, or None when the recipe keeps the builder's codes."""
    if recipe.precision != "int4" or (
        recipe.weight_search == "builder" and not recipe.int8_matmuls and not recipe.int8_block_size
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
        "checkpoint": str(checkpoint.path),
        "config": checkpoint.config,
        "trust_remote_code": checkpoint.trust_remote_code,
    }


def requantize(
    model_or_path: onnx.ModelProto | str | Path, source: CheckpointWeights | OnnxWeights, spec: dict[str, Any]
) -> dict[str, Any]:
    """Re-quantize the MatMulNBits nodes of a graph (a ModelProto, changed in place, or a
    model.onnx path, rewritten with its model.onnx.data). Returns a report for the manifest."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = None
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        model = onnx.load(str(path))
    else:
        model = model_or_path
    graph = model.graph
    search = spec["weight_search"]
    int8, qkv_sizes = list(spec.get("int8", [])), spec.get("qkv_sizes")
    imatrix = None
    if search == "imatrix":
        from ...imatrix import CheckpointFiles, load_or_compute

        print(PHASE + "imatrix: calibration text")
        ck = CheckpointFiles(
            path=Path(spec["checkpoint"]), config=spec["config"], trust_remote_code=spec.get("trust_remote_code", False)
        )
        imatrix = load_or_compute(ck)
    print(PHASE + "re-quantizing weights (edgekit)")

    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    report: dict[str, Any] = {
        "weight_search": search,
        "int8_matmuls": int8,
        "requantized": 0,
        "split": 0,
        "kept": [],
        "imatrix": imatrix.summary() if imatrix else None,
        "imatrix_missing": [],
    }
    new_nodes, add = [], []
    drop: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
        named = _NODE_BASE.match(node.name)
        base = named.group(1) if named else node.name
        b_name, s_name = node.input[1], node.input[2]
        zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
        runs = plan(base, n, bits, int8, qkv_sizes)
        int8_block = spec.get("int8_block_size") or block
        unchanged = len(runs) == 1 and runs[0][3] == bits and (bits != 8 or int8_block == block)
        if (search == "builder" and unchanged) or len(node.input) > 4:
            new_nodes.append(node)
            continue
        if any(uses.get(x, 0) > 1 for x in (b_name, s_name, zp_name) if x) or b_name not in inits:
            report["kept"].append(f"{node.name}: weights shared with another node (tied embedding)")
            new_nodes.append(node)
            continue
        w = source.weight_for(base, n, k)
        if w is None:
            report["kept"].append(f"{node.name}: no matching float weight")
            new_nodes.append(node)
            continue
        old = dequantize_matmulnbits(
            numpy_helper.to_array(inits[b_name]),
            numpy_helper.to_array(inits[s_name]),
            numpy_helper.to_array(inits[zp_name]) if zp_name else None,
            bits,
            block,
            n,
            k,
        )
        rel = float(np.sqrt(np.mean((old - w) ** 2) / max(float(np.mean(w * w)), 1e-30)))
        if rel > _MISMATCH:
            report["kept"].append(f"{node.name}: checkpoint tensor does not match the node (rel. diff {rel:.2f})")
            new_nodes.append(node)
            continue
        importance = None
        if imatrix is not None:
            from ...imatrix import onnx_node_importance

            importance = onnx_node_importance(imatrix, node.name, k)
            if importance is None:
                report["imatrix_missing"].append(node.name)
        scale_type = inits[s_name].data_type
        prefix = b_name.rsplit("_Q", 1)[0] if "_Q" in b_name else b_name
        drop.update(x for x in (b_name, s_name, zp_name) if x)
        outputs = []
        for label, r0, r1, rbits in runs:
            rblock = int8_block if rbits == 8 else block
            q, scale, zp = quantize_blocks(w[r0:r1], rbits, rblock, importance)
            pb, ps, pz = pack_matmulnbits(q, scale, zp, rbits)
            tag = f".{label}" if label else ""
            names = (f"{prefix}{tag}_Q{rbits}G{rblock}", f"{prefix}{tag}_scale", f"{prefix}{tag}_zp")
            if len(runs) == 1 and rbits == bits and rblock == block:  # same node and names: only the codes change
                names = (b_name, s_name, zp_name or f"{prefix}_zp")
            ps = ps.astype(helper.tensor_dtype_to_np_dtype(scale_type))
            add += [
                numpy_helper.from_array(pb, names[0]),
                numpy_helper.from_array(ps, names[1]),
                numpy_helper.from_array(pz, names[2]),
            ]
            out = node.output[0] if len(runs) == 1 else f"{node.output[0]}/{label}"
            outputs.append(out)
            new_nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [node.input[0], *names],
                    [out],
                    name=f"{base}_Q{rbits}" if len(runs) == 1 else f"{base}_{label}_Q{rbits}",
                    domain="com.microsoft",
                    **{**attrs, "N": r1 - r0, "bits": rbits, "block_size": rblock},
                )
            )
        if len(runs) > 1:
            new_nodes.append(helper.make_node("Concat", outputs, [node.output[0]], name=f"{base}/Concat", axis=-1))
            report["split"] += 1
        report["requantized"] += 1
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
        + ")"
    ]
    if report["split"]:
        notes.append(f"{report['split']} fused qkv MatMuls split by width and concatenated")
    if report["kept"]:
        notes.append(f"{len(report['kept'])} MatMuls kept the quantizer's codes ({report['kept'][0]})")
    if report.get("imatrix_missing"):
        notes.append(f"{len(report['imatrix_missing'])} MatMuls found no imatrix entry and were searched unweighted")
    return notes
