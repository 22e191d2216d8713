"""The builder's k-quant search of one MatMul weight, a few thousand rows at a time.

onnxruntime's quant_tensor_k_quant_cpu (which the genai builder's k_quant algorithm calls for
every MatMul, through rtn_quantize) works on the whole weight at once: a float32 copy, a dozen
full-size temporaries per search step and a float64 result. On a 128k-vocabulary lm_head
([128256, 2048], 1 GiB in float32) that was ~6 GiB on top of the builder's own model and
proto: the stream child of a Llama-3.2-1B-shaped export reached 11.1 GiB in the template's
"quantizing to int4" step, and a tied model cannot skip that search (the embedding shares the
lm_head's codes, which edgekit keeps; stream.template_options).

Every step of that search is per block (reductions along a block's 32 values, elementwise
arithmetic, a per-block choice), so the same function run on consecutive row ranges gives
the same codes, scales and zero points, byte for byte (tests/test_onnx_stream.py checks it on
a weight with constant and zero blocks). chunked_k_quant() does that and returns the codes
as uint8 (the caller casts them to uint8 anyway) instead of float64: the search's memory is
then one chunk's, the result a byte per weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Blocks searched at once: 8192 blocks of 32 are 1 MiB of float32 per temporary, so a search
# step stays in the CPU caches; on [9000, 2048] that took 8-9 s against 16-20 s for the whole
# weight at once or for 2**18-block chunks (2-core EPYC, loaded).
CHUNK_BLOCKS = 1 << 13


def chunked_k_quant(data: Any, num_bits: int = 4, group_size: int = 32, chunk_blocks: int | None = None) -> tuple:
    """quant_tensor_k_quant_cpu(data, num_bits, group_size), row range by row range: the same
    (q, scale float64 [blocks, 1], zero_point uint8 [blocks, 1]), with q as uint8."""
    import numpy as np
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    chunk_blocks = chunk_blocks or CHUNK_BLOCKS
    rows = data.shape[0]
    per_row = int(np.prod(data.shape[1:])) // group_size  # blocks per row of `data` (its 2-D view)
    step = max(1, chunk_blocks // max(per_row, 1))
    if rows <= step or data.size % group_size or data.ndim != 2 or data.shape[1] % group_size:
        q, scale, zp = quant_tensor_k_quant_cpu(data, num_bits, group_size)
        return q.astype(np.uint8), scale, zp
    blocks = rows * per_row
    q_out = np.empty((blocks, group_size), dtype=np.uint8)
    s_out = np.empty((blocks, 1), dtype=np.float64)
    z_out = np.empty((blocks, 1), dtype=np.uint8)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        q, scale, zp = quant_tensor_k_quant_cpu(data[r0:r1], num_bits, group_size)
        b0, b1 = r0 * per_row, r1 * per_row
        q_out[b0:b1], s_out[b0:b1], z_out[b0:b1] = q, scale, zp
        del q, scale, zp
    return q_out, s_out, z_out


def _cuda_k_quant() -> bool:
    """Whether onnxruntime's quant_tensor_k_quant_cuda would take its CUDA branch (cupy and a
    GPU); that branch is left as it is."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@contextmanager
def chunked_builder_k_quant() -> Iterator[None]:
    """Within the block, the builder's k_quant searches each MatMul weight in chunks
    (rtn_quantize calls quant_tensor_k_quant_cuda, which falls back to the CPU function)."""
    from onnxruntime.quantization.neural_compressor import weight_only

    original = weight_only.quant_tensor_k_quant_cuda
    if _cuda_k_quant():
        yield
        return
    weight_only.quant_tensor_k_quant_cuda = chunked_k_quant
    try:
        yield
    finally:
        weight_only.quant_tensor_k_quant_cuda = original
