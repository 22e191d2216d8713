"""Grow a builder graph made for a few decoder layers into the same graph for N layers.

onnxruntime-genai's builder writes every decoder layer with the same nodes, named by the
layer's number (/model/layers.7/attn/..., model.layers.7.*, past_key_values.7.*, present.7.*);
only the first layer differs (its input norm has no residual to add), the final norm is
named after the layer past the last (layers.N), and k_quant_mixed raises some layers'
MatMuls to int8 (llama.cpp's use_more_bits rule, a function of N). A template built for
TEMPLATE_LAYERS = 3 layers therefore holds every variant: layer 0, and layers 1 (int4) and
2 (int8) for the layers between. expand() clones the right template layer for each of the
N - 1 later ones, renaming its numbers, in the template's order, so the result is the
builder's own N-layer graph node for node (tests/test_onnx_stream.py compares them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

TEMPLATE_LAYERS = 3

_NUMBERED = re.compile(r"(layers\.|past_key_values\.|present\.)(\d+)")


class NotStreamable(Exception):
    """The checkpoint or graph breaks an assumption of the streamed path; the builder path runs instead."""


def layer_of(name: str) -> int | None:
    m = _NUMBERED.search(name)
    return int(m.group(2)) if m else None


def renamed(name: str, mapping: dict[int, int]) -> str:
    return _NUMBERED.sub(lambda m: m.group(1) + str(mapping.get(int(m.group(2)), int(m.group(2)))), name)


def expand_sequence(
    items: Sequence[Any],
    name_of: Callable[[Any], str],
    clone: Callable[[Any, dict[int, int]], Any],
    n_layers: int,
    template_for: Callable[[int], int],
) -> list[Any]:
    """Items of a T-layer graph (nodes, initializers, inputs...) -> the same items for n_layers.

    Items of layer 0 and items without a layer stay; each run of items of layers 1..T-1 (one
    block per layer, in layer order) becomes n_layers - 1 blocks, block i cloned from layer
    template_for(i); items named after layer T (the final norm) move to layer n_layers. Every
    item after the layers has T - 1 references renamed to n_layers - 1."""
    t_last = TEMPLATE_LAYERS
    final = {t_last: n_layers, t_last - 1: n_layers - 1}
    out: list[Any] = []
    run: list[Any] = []
    seen_layers = False

    def flush() -> None:
        if not run:
            return
        blocks: dict[int, list[Any]] = {}
        order: list[int] = []
        for item in run:
            layer = int(layer_of(name_of(item)) or 0)  # every item of a run has a layer
            if not order or order[-1] != layer:
                if layer in blocks:
                    raise NotStreamable(f"layer {layer}'s items are not contiguous in the template graph")
                order.append(layer)
                blocks[layer] = []
            blocks[layer].append(item)
        if order != list(range(1, t_last)):
            raise NotStreamable(f"template layers appear as {order}, not 1..{t_last - 1}")
        for i in range(1, n_layers):
            t = template_for(i)
            out.extend(clone(item, {t: i, t - 1: i - 1}) for item in blocks[t])
        run.clear()

    for item in items:
        layer = layer_of(name_of(item))
        if layer is not None and 1 <= layer < t_last:
            run.append(item)
            seen_layers = True
            continue
        flush()
        out.append(clone(item, final) if seen_layers or layer == t_last else item)
    flush()
    return out


def clone_node(node: onnx.NodeProto, mapping: dict[int, int]) -> onnx.NodeProto:
    from onnx import NodeProto

    new = NodeProto()
    new.CopyFrom(node)
    new.name = renamed(node.name, mapping)
    for field in (new.input, new.output):
        for j, name in enumerate(field):
            field[j] = renamed(name, mapping)
    if any(a.g.node or a.graphs for a in new.attribute):
        raise NotStreamable(f"{node.name} has a subgraph attribute")
    return new


def clone_named(proto: Any, mapping: dict[int, int]) -> Any:
    """A copy of a TensorProto or ValueInfoProto under its renamed name."""
    new = type(proto)()
    new.CopyFrom(proto)
    new.name = renamed(proto.name, mapping)
    return new


def more_bits_layers(n: int) -> set[int]:
    """The layers k_quant_mixed raises to int8 in the builder (builders/base.py,
    make_matmul_mixed_precision: llama.cpp's use_more_bits)."""
    return {i for i in range(n) if i < n / 8 or i >= 7 * n / 8 or (i - round(n / 8)) % 3 == 2}


def template_chooser(n_layers: int, mixed: bool, signature: Callable[[int], Any]) -> Callable[[int], int]:
    """Layer i of n_layers -> the template layer (1..T-1) the builder writes the same way:
    same int8 choice under k_quant_mixed, same value-dependent structure (signature: e.g.
    which biases are non-zero, since the builder leaves out the Add of an all-zero bias)."""
    upgraded_t = more_bits_layers(TEMPLATE_LAYERS) if mixed else set()
    upgraded_n = more_bits_layers(n_layers) if mixed else set()
    cache: dict[int, int] = {}

    def choose(i: int) -> int:
        if i not in cache:
            for t in range(1, TEMPLATE_LAYERS):
                if (t in upgraded_t) == (i in upgraded_n) and signature(t) == signature(i):
                    cache[i] = t
                    break
            else:
                raise NotStreamable(f"no template layer is built like layer {i} (value-dependent structure differs)")
        return cache[i]

    return choose
