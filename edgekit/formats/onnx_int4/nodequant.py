"""edgekit re-quantization, one MatMulNBits node at a time, on both cores.

rewrite.requantize() (a whole graph in memory) and filling.Filler (a streamed graph, written
tensor by tensor) share these: node_plan() decides from the graph alone whether a node is
re-quantized, requantize_node() does it from the node's float weight, ordered_map() runs that
on WORKERS threads (numpy releases the GIL in the block search) with only a few results in
flight, so memory holds a few tensors, not the model.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .childlog import PHASE
from .gptq import gptq_blocks
from .requant import block_minimums, dequantize_matmulnbits, pack_matmulnbits, plan, quantize_blocks

if TYPE_CHECKING:
    import onnx

    from ...imatrix import Imatrix

WORKERS = 2  # one thread per core of a 2-core laptop or CI runner; more only queue behind them
NODE_BASE = re.compile(r"^(.*/MatMul)(?:_Q\d+)?$")
MISMATCH = 0.3  # relative RMS difference above which a checkpoint tensor is not this node's weight


@dataclass(frozen=True)
class NodeResult:
    """What one MatMulNBits node becomes. Kept nodes carry the reason and no tensors."""

    nodes: tuple  # NodeProtos that replace the node (the node itself when kept)
    tensors: tuple = ()  # (name, ndarray) initializers the new nodes read, in graph order
    drop: tuple = ()  # initializer names the new nodes no longer read
    kept: str | None = None  # why the quantizer's codes stay (for the report); None: re-quantized or untouched
    split: bool = False  # a fused qkv split by width and concatenated
    imatrix_missing: bool = False


def node_base(name: str) -> str:
    """/model/layers.3/attn/qkv_proj/MatMul_Q4 -> /model/layers.3/attn/qkv_proj/MatMul."""
    m = NODE_BASE.match(name)
    return m.group(1) if m else name


def node_plan(
    node: onnx.NodeProto, tensor_of: Callable[[str], Any], uses: dict[str, int], spec: dict[str, Any]
) -> NodeResult | None:
    """None when `node` is to be re-quantized; else what it stays (kept, with the reason if any).
    Decided from the graph alone, before any weight is read."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, bits, block = attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    base = node_base(node.name)
    b_name, s_name = node.input[1], node.input[2]
    zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
    runs = plan(base, n, bits, spec.get("int8", []), spec.get("qkv_sizes"))
    int8_block = spec.get("int8_block_size") or block
    unchanged = len(runs) == 1 and runs[0][3] == bits and (bits != 8 or int8_block == block)
    if (spec["weight_search"] == "builder" and unchanged) or len(node.input) > 4:
        return NodeResult((node,))
    if any(uses.get(x, 0) > 1 for x in (b_name, s_name, zp_name) if x) or tensor_of(b_name) is None:
        return NodeResult((node,), kept=f"{node.name}: weights shared with another node (tied embedding)")
    return None


def requantize_node(
    node: onnx.NodeProto,
    tensor_of: Callable[[str], Any],
    uses: dict[str, int],
    source: Any,
    spec: dict[str, Any],
    imatrix: Imatrix | None,
    old_codes: Callable[[str], Any] | None,
) -> NodeResult:
    """Re-quantize one MatMulNBits node from its float weight (`source.weight_for`).

    tensor_of(name) is the node's initializer TensorProto (dtype and dims; None if it is not an
    initializer); old_codes(name) its array, or None when the data is not at hand (a streamed
    layer), which skips the check that the checkpoint tensor is this node's weight."""
    import numpy as np
    from onnx import helper, numpy_helper

    if (planned := node_plan(node, tensor_of, uses, spec)) is not None:
        return planned
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    base = node_base(node.name)
    b_name, s_name = node.input[1], node.input[2]
    zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
    runs = plan(base, n, bits, spec.get("int8", []), spec.get("qkv_sizes"))
    int8_block = spec.get("int8_block_size") or block
    w = source.weight_for(base, n, k)
    if w is None:
        return NodeResult((node,), kept=f"{node.name}: no matching float weight")
    old_b = old_codes(b_name) if old_codes is not None else None
    if old_codes is not None and old_b is not None:
        old = dequantize_matmulnbits(
            old_b, old_codes(s_name), old_codes(zp_name) if zp_name else None, bits, block, n, k
        )
        rel = float(np.sqrt(np.mean((old - w) ** 2) / max(float(np.mean(w * w)), 1e-30)))
        if rel > MISMATCH:
            return NodeResult(
                (node,), kept=f"{node.name}: checkpoint tensor does not match the node (rel. diff {rel:.2f})"
            )
    importance, missing = None, False
    if imatrix is not None:
        from ...imatrix import onnx_node_importance

        importance = onnx_node_importance(imatrix, node.name, k)
        missing = importance is None
    hessian = None
    if spec["weight_search"] == "gptq" and imatrix is not None and imatrix.activations is not None:
        from ...imatrix import onnx_node_modules

        # None (no recorded input of this width): the node gets the imatrix search instead
        hessian = imatrix.activations.second_moments(onnx_node_modules(node.name), k)
        missing = missing or hessian is None
    scale_dtype = helper.tensor_dtype_to_np_dtype(tensor_of(s_name).data_type)
    prefix = b_name.rsplit("_Q", 1)[0] if "_Q" in b_name else b_name
    nodes, tensors, outputs = [], [], []
    block_sums: dict[int, str] = {}  # block size -> the input's block sums (float_matmul), made once per node
    for label, r0, r1, rbits in runs:
        rblock = int8_block if rbits == 8 else block
        # float zero points for int4 only: onnxruntime's kernel refuses them with 8-bit codes
        mode = spec.get("zero_points", "integer") if rbits == 4 else "integer"
        if mode == "float_matmul" and k % rblock:
            mode = "integer"  # the block sums reshape the input into whole blocks
        search = "integer" if mode == "integer" else "float"
        if hessian is not None:
            q, scale, zp = gptq_blocks(w[r0:r1], hessian, rbits, rblock, search, scale_dtype)
        else:
            q, scale, zp = quantize_blocks(w[r0:r1], rbits, rblock, importance, search, scale_dtype)
        pb, ps, pz = pack_matmulnbits(q, scale, zp, rbits)
        tag = f".{label}" if label else ""
        names = (f"{prefix}{tag}_Q{rbits}G{rblock}", f"{prefix}{tag}_scale", f"{prefix}{tag}_zp")
        if len(runs) == 1 and rbits == bits and rblock == block:  # same node and names: only the codes change
            names = (b_name, s_name, zp_name or f"{prefix}_zp")
        out = node.output[0] if len(runs) == 1 else f"{node.output[0]}/{label}"
        outputs.append(out)
        node_attrs = {**attrs, "N": r1 - r0, "bits": rbits, "block_size": rblock}
        node_name = f"{base}_Q{rbits}" if len(runs) == 1 else f"{base}_{label}_Q{rbits}"
        if mode != "float_matmul":
            if mode == "float":
                pz = pz.astype(scale_dtype)  # MatMulNBits: float zero points have the scales' type
            tensors += [(names[0], pb), (names[1], ps.astype(scale_dtype)), (names[2], pz)]
            nodes.append(
                helper.make_node(
                    "MatMulNBits", [node.input[0], *names], [out], name=node_name, domain="com.microsoft", **node_attrs
                )
            )
            continue
        # float_matmul: symmetric codes on the packed int4 kernel, plus the block minimums as
        # block_sums(x) @ mins, a float MatMul 1/block the size of the weight (a float
        # zero_points input would send MatMulNBits to its unpacked path: benchmarks/zero_points.py)
        if rblock not in block_sums:
            sums = f"{base}/BlockSums{rblock}"
            # [batch, sequence, K] -> [batch, sequence, K / block, block] (the builder's and
            # optimum's MatMul inputs are rank 3). Shape and axes are Constant nodes, not
            # initializers: those go to model.onnx.data, where shape inference cannot read them.
            shape = numpy_helper.from_array(np.array([0, 0, k // rblock, rblock], dtype=np.int64))
            axes = numpy_helper.from_array(np.array([-1], dtype=np.int64))
            nodes += [
                helper.make_node("Constant", [], [f"{sums}/shape"], name=f"{sums}/shape", value=shape),
                helper.make_node("Constant", [], [f"{sums}/axes"], name=f"{sums}/axes", value=axes),
                helper.make_node(
                    "Reshape", [node.input[0], f"{sums}/shape"], [f"{sums}/Reshape/output_0"], name=f"{sums}/Reshape"
                ),
                helper.make_node(
                    "ReduceSum",
                    [f"{sums}/Reshape/output_0", f"{sums}/axes"],
                    [f"{sums}/output_0"],
                    name=sums,
                    keepdims=0,
                ),
            ]
            block_sums[rblock] = f"{sums}/output_0"
        mins = f"{prefix}{tag}_min"
        tensors += [
            (names[0], pb),
            (names[1], ps.astype(scale_dtype)),
            (mins, block_minimums(scale, zp, rbits).astype(scale_dtype)),
        ]
        nodes += [
            helper.make_node(
                "MatMulNBits",
                [node.input[0], *names[:2]],
                [f"{out}/codes"],
                name=node_name,
                domain="com.microsoft",
                **node_attrs,
            ),
            helper.make_node(
                "MatMul", [block_sums[rblock], mins], [f"{out}/minimums"], name=f"{node_name}/BlockMinimums/MatMul"
            ),
            helper.make_node("Add", [f"{out}/codes", f"{out}/minimums"], [out], name=f"{node_name}/BlockMinimums/Add"),
        ]
    if len(runs) > 1:
        nodes.append(helper.make_node("Concat", outputs, [node.output[0]], name=f"{base}/Concat", axis=-1))
    return NodeResult(
        tuple(nodes),
        tuple(tensors),
        tuple(x for x in (b_name, s_name, zp_name) if x),
        split=len(runs) > 1,
        imatrix_missing=missing,
    )


def ordered_map(fn: Callable, items: Iterable, workers: int = WORKERS, ahead: int = 2 * WORKERS) -> Iterator:
    """fn over items on `workers` threads, results in input order, at most `ahead` in flight
    (so a streamed export holds a few tensors, not the model)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class LockedSource:
    """A weight source read from worker threads one call at a time (safetensors handles are shared)."""

    def __init__(self, source):
        self._source, self._lock = source, threading.Lock()
        self.qkv_sizes = getattr(source, "qkv_sizes", None)

    def weight_for(self, base: str, n: int, k: int) -> Any:
        with self._lock:
            return self._source.weight_for(base, n, k)


def load_imatrix(spec: dict[str, Any]) -> Imatrix | None:
    if spec["weight_search"] not in ("imatrix", "gptq"):
        return None
    import dataclasses

    from ...checkpoint import CheckpointFiles
    from ...imatrix import load_or_compute
    from .childlog import ChildProgress

    print(PHASE + "imatrix: calibration text")
    ck = CheckpointFiles(
        path=Path(spec["checkpoint"]), config=spec["config"], trust_remote_code=spec.get("trust_remote_code", False)
    )
    imatrix = load_or_compute(ck, progress=ChildProgress())
    if spec["weight_search"] == "gptq":
        from ...activations import load_or_compute as load_activations

        print(PHASE + "GPTQ: calibration inputs")
        imatrix = dataclasses.replace(imatrix, activations=load_activations(ck, progress=ChildProgress()))
    return imatrix


def new_report(spec: dict[str, Any], imatrix: Imatrix | None) -> dict[str, Any]:
    return {
        "weight_search": spec["weight_search"],
        "int8_matmuls": list(spec.get("int8", [])),
        "zero_points": spec.get("zero_points", "integer"),
        "requantized": 0,
        "split": 0,
        "kept": [],
        "imatrix": imatrix.summary() if imatrix else None,
        "activations": imatrix.activations.summary() if imatrix and imatrix.activations else None,
        "imatrix_missing": [],
    }


def count(report: dict[str, Any], node: onnx.NodeProto, result: NodeResult) -> None:
    if result.kept:
        report["kept"].append(result.kept)
    elif result.tensors:
        report["requantized"] += 1
        report["split"] += int(result.split)
        if result.imatrix_missing:
            report["imatrix_missing"].append(node.name)
