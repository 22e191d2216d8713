"""Token embeddings quantized by edgekit (recipe key `embeddings`): the float embedding Gather
becomes a GatherBlockQuantized over uint8 codes, quantized blockwise along the hidden axis.

Why edgekit writes it and not the builder: the builder quantizes an untied embedding only to
int4, only with algorithm "default" (its rtn/k_quant quantizers take MatMuls alone), and stores
the codes as an ONNX int4 tensor, which onnxruntime 1.32's ORT format cannot hold (a phone
bundle then keeps model.onnx). GatherBlockQuantized also takes uint8 data with `bits` = 4 (two
codes a byte, low nibble first) or 8, the layout the builder itself uses for a tied embedding
that reads lm_head's MatMulNBits codes, and that one converts to ORT format (docs/mobile.md).

What onnxruntime 1.32.0's CPU kernel accepts for uint8 data (contrib_ops/cpu/quantization/
gather_block_quantized.cc, checked on one-node models in tests/test_embedquant.py):
- gather_axis 0 and quantize_axis the last one; block_size a power of two, at least 16;
- scales [rows, hidden / block] in the output's type (float or float16);
- zero_points optional, uint8, [rows, blocks] for 8 bits, two a byte [rows, ceil(blocks / 2)]
  for 4 bits; without them the kernel subtracts 128 (8 bits) or 8 (4 bits). Integer only: the
  float minimums edgekit gives MatMulNBits (zero_points = "float_matmul") have no place here.
- The kernel indexes 4-bit zero points over the flattened [rows x blocks] table while its shape
  check wants them padded per row, so the two agree only for an even number of blocks a row:
  4-bit embeddings need hidden / block even (Phi-3: 3072 / 32 = 96), or they stay float.

Codes are quantize_blocks' ("integer" zero points, no importance: an embedding row is read, not
multiplied, so there is no input statistic to weight it by), the same search as every
MatMulNBits; the output is (q - zero point) * scale in float32, exactly dequantize_matmulnbits.
Rows are quantized ROW_BYTES of float at a time: a streamed export reads its float embedding
from the template in those chunks and never holds it whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .nodequant import NodeResult
from .requant import pack_matmulnbits, quantize_blocks

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from .recipe import OnnxRecipe

# recipe value -> bits of the codes edgekit writes
EMBEDDING_BITS = {"int4": 4, "int8": 8}
# What `embeddings = "auto"` becomes in a phone bundle (mobile = true) when the model does not
# tie its embedding: the width the default recipe's lm_head has (k_quant_last keeps it int8).
MOBILE_EMBEDDINGS = "int8"
ROW_BYTES = 64 << 20  # float bytes quantized at a time


def embedding_bits(recipe: OnnxRecipe) -> int | None:
    """Bits of the embedding codes edgekit writes for this recipe, or None to leave it as built."""
    if recipe.precision != "int4":
        return None
    if recipe.embeddings == "auto" and recipe.mobile:
        return EMBEDDING_BITS[MOBILE_EMBEDDINGS]
    return EMBEDDING_BITS.get(recipe.embeddings)


def find_embedding(nodes: list, inits: dict[str, Any], uses: dict[str, int]) -> onnx.NodeProto | None:
    """The token embedding's float Gather (a 2-D float initializer gathered on axis 0, read by
    no other node), or None: a tied embedding the builder already shares with lm_head's codes
    is a GatherBlockQuantized, not a Gather."""
    from onnx import TensorProto, helper

    for node in nodes:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        t = inits.get(node.input[0])
        if t is None or len(t.dims) != 2 or t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if axis == 0 and uses.get(node.input[0], 0) == 1 and "embed" in (node.name + node.input[0]).lower():
            return node
    return None


def why_kept(proto: onnx.TensorProto, bits: int, block: int) -> str | None:
    """Why this embedding cannot be written as GatherBlockQuantized codes, or None."""
    rows, hidden = (int(d) for d in proto.dims)
    if hidden % block:
        return f"hidden size {hidden} is not a multiple of the block size {block}"
    if bits == 4 and (hidden // block) % 2:
        return (
            f"{hidden // block} blocks a row is odd: onnxruntime 1.32 reads 4-bit GatherBlockQuantized "
            "zero points unpadded, its shape check wants them padded per row"
        )
    return None


def quantize_embedding(
    node: onnx.NodeProto,
    proto: onnx.TensorProto,
    read_rows: Callable[[int, int], np.ndarray],
    bits: int,
    block: int,
) -> NodeResult:
    """The GatherBlockQuantized node and its (codes, scales, zero points) that replace `node`.
    read_rows(r0, r1) gives the float rows [r0, r1) of the embedding `proto` describes."""
    import numpy as np
    from onnx import helper

    rows, hidden = (int(d) for d in proto.dims)
    dtype = helper.tensor_dtype_to_np_dtype(proto.data_type)
    nb = hidden // block
    codes = np.empty((rows, hidden * bits // 8), dtype=np.uint8)
    scales = np.empty((rows, nb), dtype=dtype)
    zps = np.empty((rows, (nb + 1) // 2 if bits == 4 else nb), dtype=np.uint8)
    step = max(1, ROW_BYTES // (hidden * 4))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        # each block is searched on its own, so row chunks give the codes the whole would
        q, s, z = quantize_blocks(np.asarray(read_rows(r0, r1)), bits, block, None, "integer", dtype)
        b, ps, pz = pack_matmulnbits(q, s, z, bits)
        codes[r0:r1] = b.reshape(r1 - r0, -1)
        scales[r0:r1] = ps.astype(dtype)
        zps[r0:r1] = pz
    name = proto.name
    names = (f"{name}_Q{bits}G{block}", f"{name}_scale", f"{name}_zp")
    gbq = helper.make_node(
        "GatherBlockQuantized",
        [names[0], node.input[1], names[1], names[2]],
        list(node.output),
        name=f"{node.name}_Q{bits}",
        domain="com.microsoft",
        bits=bits,
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )
    return NodeResult((gbq,), ((names[0], codes), (names[1], scales), (names[2], zps)), (name,))


def dequantize_embedding(codes: np.ndarray, scales: np.ndarray, zps: np.ndarray, bits: int, block: int) -> np.ndarray:
    """GatherBlockQuantized's uint8 initializers -> the float table it gathers from (numpy, float32)."""
    import numpy as np

    rows, nb = scales.shape
    if bits == 4:
        q = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(rows, -1)
        z = np.stack([zps & 0x0F, zps >> 4], axis=-1).reshape(rows, -1)[:, :nb]
    else:
        q, z = codes, zps
    w = (q.reshape(rows, nb, block).astype(np.float32) - z[..., None].astype(np.float32)) * scales[..., None].astype(
        np.float32
    )
    return w.reshape(rows, nb * block)


def plan_embedding(nodes: list, inits: dict[str, Any], uses: dict[str, int], spec: dict[str, Any]) -> tuple:
    """(the Gather to replace or None, why it is kept or None, its float initializer or None) for
    a requant spec; (None, None, None) when the recipe leaves the embedding as built."""
    bits = spec.get("embedding_bits")
    if not bits:
        return None, None, None
    node = find_embedding(nodes, inits, uses)
    if node is None:
        return None, "no float embedding Gather in the graph (a tied embedding shares lm_head's codes)", None
    proto = inits[node.input[0]]
    return node, why_kept(proto, bits, spec["embedding_block"]), proto


def embedding_report(node: onnx.NodeProto | None, proto: Any, bits: int, block: int, kept: str | None) -> dict:
    """The manifest's record (edgekit_requantization.embedding)."""
    if node is None:
        return {"bits": None, "kept": kept}
    rows, hidden = (int(d) for d in proto.dims)
    entry: dict[str, Any] = {"tensor": proto.name, "rows": rows, "hidden": hidden, "bits": None if kept else bits}
    if kept:
        entry["kept"] = kept
    else:
        entry["block_size"] = block
    return entry
