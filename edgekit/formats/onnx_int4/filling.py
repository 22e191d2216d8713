"""Fill a streamed graph's model.onnx.data one tensor at a time (see stream.py).

Order is the builder path's: first the initializers requantize() keeps (in graph order), then
the re-quantized MatMulNBits tensors in node order, each written as soon as it is ready.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...layerwise import read_tensors, tensor_files
from ...memory import release_memory
from .expand import NotStreamable, layer_of

if TYPE_CHECKING:
    import onnx

    from ...imatrix import Imatrix

_CKPT_LAYER = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")
# Float tensors of a layer the builder builds from several checkpoint tensors, as
# (checkpoint suffixes concatenated in order): the packed q/k/v bias of Qwen2-style attention.
_PACKED = (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),)
# Re-quantized tensors between two release_memory() calls: the two quantizing threads free
# each float weight and its search buffers into their own malloc arenas, which glibc keeps;
# handed back every few tensors the RSS stays near what is live (a call is cheap next to
# searching the codes of 8 tensors).
RELEASE_EVERY = 8


class CheckpointTensors:
    """The checkpoint's safetensors by name, read one tensor at a time (torch, own dtype); each
    read opens its file and closes it (layerwise.read_tensors says why)."""

    def __init__(self, path: Path):
        self.where = tensor_files(path)
        self.by_layer: dict[int, list[str]] = {}
        for name in self.where:
            if m := _CKPT_LAYER.match(name):
                self.by_layer.setdefault(int(m.group(2)), []).append(name)

    def get(self, name: str) -> Any:
        return read_tensors(self.where, [name])[0]


def _layer_pattern(name: str, layer: int) -> str:
    return re.sub(rf"layers\.{layer}\.", "layers.{L}.", name, count=1)


class TemplateCodesKept(Exception):
    """A node keeps the builder's codes, but the template was quantized more cheaply than the
    recipe says (stream.template_options): raised before model.onnx.data is written."""


class Filler:
    def __init__(self, template: Path, graph: onnx.GraphProto, checkpoint: Path, final_codes: bool = True) -> None:
        self.template = template
        self.final_codes = final_codes  # False: the template's codes must not reach the bundle
        self.tensors = CheckpointTensors(checkpoint)
        self.template_inits = {t.name: t for t in graph.initializer}
        self._rules: dict[str, tuple[str, ...]] = {}

    # -- structure that depends on values ----------------------------------------------------
    def signature(self, layer: int) -> tuple[str, ...]:
        """The biases of a layer the builder writes an Add for (it skips all-zero ones)."""
        import torch

        names = self.tensors.by_layer.get(layer, [])
        return tuple(
            sorted(
                _layer_pattern(nm, layer)
                for nm in names
                if nm.endswith(".bias") and torch.count_nonzero(self.tensors.get(nm)) > 0
            )
        )

    # -- bytes ---------------------------------------------------------------------------------
    def template_span(self, name: str) -> tuple[Path, int, int]:
        """(file, offset, length) of a template tensor's data."""
        info = {e.key: e.value for e in self.template_inits[name].external_data}
        return self.template / info["location"], int(info.get("offset", 0)), int(info["length"])

    def template_bytes(self, name: str) -> bytes:
        path, offset, length = self.template_span(name)
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _cast_bytes(self, names: list[str], proto: onnx.TensorProto) -> bytes:
        import numpy as np
        import torch
        from onnx import helper

        parts = [self.tensors.get(nm).reshape(-1) for nm in names]
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        want = helper.tensor_dtype_to_np_dtype(proto.data_type)
        if int(np.prod(proto.dims)) != t.numel():
            return b""
        # what the builder does: the fp32 model's parameter cast to the graph's io dtype
        t = t.float()
        return (
            t.numpy().astype(want).tobytes()
            if want != np.dtype("V2")
            else t.bfloat16().view(torch.int16).numpy().tobytes()
        )

    def _rule(self, template_name: str) -> tuple[str, ...]:
        """Checkpoint tensor patterns ({L} = layer) that give this template tensor's bytes."""
        if template_name in self._rules:
            return self._rules[template_name]
        layer = int(layer_of(template_name) or 0)  # a cloned layer's name always has one
        proto = self.template_inits[template_name]
        want = self.template_bytes(template_name)
        names = self.tensors.by_layer.get(layer, [])
        same = [template_name] if template_name in self.tensors.where else []
        packed = [
            [f"{pre}{s}" for s in group]
            for group in _PACKED
            for pre in {nm[: nm.index("layers.") + len(f"layers.{layer}.")] for nm in names}
        ]
        for cand in [same] + [[nm] for nm in names] + packed:
            if cand and all(c in self.tensors.where for c in cand) and self._cast_bytes(cand, proto) == want:
                rule = tuple(_layer_pattern(c, layer) for c in cand)
                self._rules[template_name] = rule
                return rule
        raise NotStreamable(f"no checkpoint tensor gives the template's {template_name}")

    def _template_rows(self, name: str, proto: onnx.TensorProto) -> Callable[[int, int], Any]:
        """read_rows(r0, r1) of a 2-D template tensor, straight from its data file (a 200k-row
        embedding is never read whole)."""
        import numpy as np
        from onnx import helper

        path, offset, _ = self.template_span(name)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(proto.data_type))
        width = int(proto.dims[1])

        def read_rows(r0: int, r1: int) -> Any:
            count = (r1 - r0) * width
            a = np.fromfile(path, dtype=dtype, count=count, offset=offset + r0 * width * dtype.itemsize)
            if a.size != count:
                raise NotStreamable(f"{path.name} ends inside {name}")
            return a.reshape(r1 - r0, width)

        return read_rows

    def layer_bytes(self, template_name: str, layer: int) -> bytes:
        rule = self._rule(template_name)
        return self._cast_bytes([p.replace("{L}", str(layer)) for p in rule], self.template_inits[template_name])

    # -- the whole file ------------------------------------------------------------------------
    def write(
        self,
        parts: dict[str, list],
        template_name: Callable[[str], tuple[str, bool]],
        source: Any,
        spec: dict[str, Any],
        imatrix: Imatrix | None,
        report: dict[str, Any],
        out: Path,
    ) -> None:
        import os

        from onnx import numpy_helper

        from .embedquant import embedding_report, plan_embedding, quantize_embedding
        from .nodequant import count, node_plan, ordered_map, requantize_node

        inits = {t.name: t for t in parts["initializer"]}
        uses: dict[str, int] = {}
        for node in parts["node"]:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        # The token embedding (outside the cloned layers, so the template's): replaced by
        # edgekit's codes in node order, as rewrite.requantize() does, read in row chunks.
        embedding, emb_kept, emb_proto = plan_embedding(parts["node"], inits, uses, spec)
        if spec.get("embedding_bits"):
            report["embedding"] = embedding_report(
                embedding, emb_proto, spec["embedding_bits"], spec["embedding_block"], emb_kept
            )
        if emb_kept or (embedding is not None and template_name(embedding.input[0])[1]):
            embedding = None

        def old_codes(name):
            tname, cloned = template_name(name)
            if cloned or tname not in self.template_inits:
                return None
            return numpy_helper.to_array(self.template_inits[tname], base_dir=str(self.template))

        # Which nodes are re-quantized decides which tensors are kept, and the kept ones come
        # first in the file: the structural checks are cheap, and the few nodes outside the
        # cloned layers (lm_head) are done up front to know whether they keep the codes.
        early: dict[str, Any] = {}
        drop: set[str] = {embedding.input[0]} if embedding is not None else set()
        for node in parts["node"]:
            if node.op_type != "MatMulNBits":
                continue
            kept = node_plan(node, inits.get, uses, spec)
            cloned = template_name(node.input[1])[1]
            if kept is not None:
                if cloned and kept.kept:
                    raise NotStreamable(kept.kept)
                if not self.final_codes:
                    raise TemplateCodesKept(kept.kept or f"{node.name} keeps the builder's codes")
                continue
            if not cloned:
                early[node.name] = requantize_node(node, inits.get, uses, source, spec, imatrix, old_codes)
                drop.update(early[node.name].drop)
                if early[node.name].kept and not self.final_codes:
                    raise TemplateCodesKept(early[node.name].kept)
            else:
                drop.update(x for x in node.input[1:4] if x)
        data = _DataFile(out / "model.onnx.data")
        try:
            kept_inits = [t for t in parts["initializer"] if t.name not in drop]
            for t in kept_inits:
                tname, cloned = template_name(t.name)
                if cloned:
                    data.put(t, self.layer_bytes(tname, int(layer_of(t.name) or 0)))
                else:  # copied in chunks: a 14B model's float embedding alone is 2 GB
                    data.copy(t, *self.template_span(tname))

            def one(node):
                if node is embedding:
                    return quantize_embedding(
                        node,
                        emb_proto,
                        self._template_rows(template_name(node.input[0])[0], emb_proto),
                        spec["embedding_bits"],
                        spec["embedding_block"],
                    )
                if node.op_type != "MatMulNBits":
                    return None
                if node.name in early:
                    return early.pop(node.name)
                result = requantize_node(node, inits.get, uses, source, spec, imatrix, old_codes)
                if result.kept and template_name(node.input[1])[1]:
                    raise NotStreamable(result.kept)
                return result

            new_nodes, added = [], []
            total, done = sum(n.op_type == "MatMulNBits" for n in parts["node"]), 0
            for node, result in zip(parts["node"], ordered_map(one, parts["node"])):
                if result is None:
                    new_nodes.append(node)
                    continue
                if node is embedding:
                    new_nodes += result.nodes
                    for name, array in result.tensors:
                        t = numpy_helper.from_array(array, name)
                        data.put(t, t.raw_data)
                        added.append(t)
                    del result
                    release_memory()
                    continue
                done += 1
                # the line the parent's ChildOutput turns into the "writing model.onnx" step
                print(f"Saving {node.name} | {done}/{total}", flush=True)
                count(report, node, result)
                new_nodes += result.nodes
                for name, array in result.tensors:
                    t = numpy_helper.from_array(array, name)
                    data.put(t, t.raw_data)
                    added.append(t)
                if done % RELEASE_EVERY == 0:
                    release_memory()
        finally:
            data.close()
        os.chmod(out / "model.onnx.data", 0o644)
        parts["node"] = new_nodes
        parts["initializer"] = kept_inits + added


class _DataFile:
    """model.onnx.data written front to back; each TensorProto gets onnx's external-data
    entries (location, offset, length), exactly as onnx.save_model would set them."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self._f = open(path, "wb")  # noqa: SIM115 - written across many put()/copy() calls, closed by close()

    def _point(self, tensor: onnx.TensorProto, length: int) -> None:
        from onnx import TensorProto

        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += length

    def put(self, tensor: onnx.TensorProto, raw: bytes) -> None:
        self._point(tensor, len(raw))
        self._f.write(raw)

    def copy(self, tensor: onnx.TensorProto, path: Path, offset: int, length: int, chunk: int = 64 << 20) -> None:
        self._point(tensor, length)
        with open(path, "rb") as f:
            f.seek(offset)
            while length:
                block = f.read(min(chunk, length))
                if not block:
                    raise NotStreamable(f"{path.name} ends before {tensor.name}'s data")
                self._f.write(block)
                length -= len(block)

    def close(self) -> None:
        self._f.close()
