"""Float weights for re-quantization, by MatMul node name: from the checkpoint or an fp32 graph."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...layerwise import read_tensors, tensor_files
from .requant import LAYER_MATMUL

if TYPE_CHECKING:
    import numpy as np


class CheckpointWeights:
    """Float weights [N, K] for builder node names, read from the checkpoint's safetensors."""

    def __init__(self, path: Path, qkv_sizes: Sequence[int] | None):
        self.qkv_sizes = list(qkv_sizes) if qkv_sizes else None
        self._files = tensor_files(path)

    def _get(self, name: str) -> np.ndarray | None:
        if name not in self._files:
            return None
        # opened per read, not held: a held mapping keeps every page read so far in RSS
        [t] = read_tensors(self._files, [name])
        return t.float().numpy()

    def weight_for(self, base: str, n: int, k: int) -> np.ndarray | None:
        import numpy as np

        def fits(t):
            return t if t is not None and t.shape == (n, k) else None

        if base.startswith("/lm_head/"):
            return (
                fits(self._get("lm_head.weight"))
                if "lm_head.weight" in self._files
                else fits(self._get("model.embed_tokens.weight"))
            )
        m = LAYER_MATMUL.match(base)
        if not m:
            return None
        pre, proj = f"model.layers.{m.group(1)}.", m.group(2)
        attn, mlp = pre + "self_attn.", pre + "mlp."
        if proj in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"):
            direct = fits(self._get(attn + proj + ".weight"))
            if direct is not None:
                return direct
            if proj == "qkv_proj":
                found = [self._get(attn + p + ".weight") for p in ("q_proj", "k_proj", "v_proj")]
                parts = [p for p in found if p is not None]
                return fits(np.concatenate(parts)) if len(parts) == len(found) else None
            fused = self._get(attn + "qkv_proj.weight")
            if fused is not None and self.qkv_sizes and proj != "o_proj":
                i = ("q_proj", "k_proj", "v_proj").index(proj)
                start = sum(self.qkv_sizes[:i])
                return fits(fused[start : start + self.qkv_sizes[i]])
            return fits(self._get(attn + "dense.weight")) if proj == "o_proj" else None
        if proj in ("gate_proj", "up_proj", "down_proj"):
            direct = fits(self._get(mlp + proj + ".weight"))
            if direct is not None or proj == "down_proj":
                return direct
            fused = self._get(mlp + "gate_up_proj.weight")  # [gate; up], as Phi-3 chunks it
            if fused is not None and fused.shape[0] == 2 * n:
                return fits(fused[:n] if proj == "gate_proj" else fused[n:])
        return None


class OnnxWeights:
    """Float weights [N, K] of the MatMuls of an fp32 ONNX graph (the optimum export)."""

    def __init__(self, path: Path):
        import onnx

        model = onnx.load(str(path))
        inits = {t.name: t for t in model.graph.initializer}
        self._by_node = {
            n.name: inits[n.input[1]]
            for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits
        }

    def weight_for(self, base: str, n: int, k: int) -> np.ndarray | None:
        from onnx import numpy_helper

        t = self._by_node.get(base)
        if t is None:
            return None
        w = numpy_helper.to_array(t).astype("float32").T
        return w if w.shape == (n, k) else None
