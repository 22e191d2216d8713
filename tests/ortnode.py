"""A one-node MatMulNBits model in onnxruntime, for tests that check initializers against the kernel."""

from __future__ import annotations

from typing import Any

import numpy as np


def matmulnbits_session(
    b: np.ndarray, s: np.ndarray, z: np.ndarray, k: int, n: int, bits: int, block: int, accuracy_level: int
) -> Any:
    """An InferenceSession computing Y = A @ W.T, W [N, K] stored as MatMulNBits B, scales S and
    zero points Z (uint8 packed, or float: the kernel takes both)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "S", "Z"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S"), numpy_helper.from_array(z, "Z")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
