"""GPTQ's calibration inputs (edgekit.activations) and the onnx-int4 weight_search = "gptq" export.

Tiny checkpoints, real passes: the inputs recorded streamed (block by block) equal the in-memory
ones, their diagonal is the importance matrix, and an exported bundle's GPTQ codes leave a
smaller layer output error on the calibration inputs than the imatrix search's.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgekit.checkpoint import resolve


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgekit.tiny import make_tiny

    root = tmp_path_factory.mktemp("activations")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny(family, root / family)
        return made[family]

    return get


def _in_modes(monkeypatch, tmp_path, compute):
    out = {}
    for mode in ("memory", "stream"):
        monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / f"cache-{mode}"))
        monkeypatch.setenv("EDGEKIT_REFERENCE", mode)
        out[mode] = compute()
    return out["memory"], out["stream"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_streamed_inputs_equal_in_memory_and_their_diagonal_is_the_imatrix(family, tiny, monkeypatch, tmp_path):
    from edgekit.activations import load_or_compute
    from edgekit.imatrix import load_or_compute as load_imatrix

    ck = resolve(str(tiny(family)))
    mem, streamed = _in_modes(monkeypatch, tmp_path, lambda: load_or_compute(ck))
    assert (mem.mode, streamed.mode) == ("memory", "stream") and not mem.cached
    assert mem.index.keys() == streamed.index.keys() and "lm_head" in mem.index
    assert mem.tokens == streamed.tokens > 500
    imatrix = load_imatrix(ck)  # the stream-mode cache is the one set last
    for name in mem.index:
        k = len(imatrix.values[name])
        h_mem, h_str = mem.second_moments([name], k), streamed.second_moments([name], k)
        assert h_mem.shape == (k, k) and h_mem.dtype == np.float32
        scale = float(np.abs(h_mem).max())
        assert float(np.abs(h_mem - h_str).max()) <= 1e-5 * scale, name
        np.testing.assert_allclose(np.diag(h_mem), imatrix.values[name], rtol=1e-5, atol=1e-7 * scale)
        assert mem.second_moments([name], k + 1) is None  # the width must agree
    if family == "llama":
        # q/k/v read one tensor, and so do gate/up: stored once
        layer = "model.layers.0."
        q, k_, v = (mem.index[f"{layer}self_attn.{p}_proj"] for p in "qkv")
        assert q == k_ == v
        assert mem.index[f"{layer}mlp.gate_proj"] == mem.index[f"{layer}mlp.up_proj"]
        assert mem.summary()["tensors"] < mem.summary()["modules"]
    again = load_or_compute(ck)
    assert again.cached and again.key == streamed.key and again.index == streamed.index


class _Progress:
    from contextlib import contextmanager

    @contextmanager
    def step(self, name, total=None):
        yield SimpleNamespace(advance=lambda n=1: None, update=lambda c, t=None: None)

    def note(self, text):
        pass


def _export(ckpt: Path, out: Path, **overrides):
    from edgekit.formats import onnx_int4
    from edgekit.targets import load_targets

    spec = load_targets().format("onnx-int4")
    out.mkdir(parents=True)
    recipe = onnx_int4.parse_recipe({**spec.recipe, **overrides}, "test")
    return onnx_int4.export(resolve(str(ckpt)), out, recipe, _Progress())


@pytest.mark.slow
def test_gptq_bundle_has_a_smaller_layer_output_error_than_the_imatrix_search(tiny, monkeypatch, tmp_path):
    """Both bundles from one tiny Llama (integer zero points, every layer MatMul int4). For each
    layer MatMul: ||(W - Q) X^T|| over the calibration inputs X, W the checkpoint's weight, Q
    the bundle's dequantized codes. GPTQ minimises exactly that; the imatrix search only a
    per-column weighting of (W - Q)."""
    import onnx
    from onnx import helper, numpy_helper
    from safetensors.torch import load_file

    from edgekit.activations import load_or_compute
    from edgekit.formats.onnx_int4.requant import dequantize_matmulnbits
    from edgekit.imatrix import onnx_node_modules

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    ckpt = tiny("llama")
    keys = dict(algorithm="k_quant_last", zero_points="integer")
    gptq = _export(ckpt, tmp_path / "gptq", weight_search="gptq", **keys)
    plain = _export(ckpt, tmp_path / "imatrix", weight_search="imatrix", **keys)
    report = gptq.quantization["edgekit_requantization"]
    assert report["weight_search"] == "gptq" and report["imatrix_missing"] == []
    assert report["activations"]["tokens"] > 500 and report["requantized"] > 0
    assert plain.quantization["edgekit_requantization"]["activations"] is None

    acts = load_or_compute(resolve(str(ckpt)))
    weights = {k: v.float().numpy() for k, v in load_file(str(ckpt / "model.safetensors")).items()}

    def output_errors(bundle: Path) -> dict[str, float]:
        model = onnx.load(str(bundle / "model.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        errors = {}
        for node in model.graph.node:
            if node.op_type != "MatMulNBits" or not node.name.startswith("/model/layers."):
                continue
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            k, n = a["K"], a["N"]
            q = dequantize_matmulnbits(
                inits[node.input[1]], inits[node.input[2]], inits[node.input[3]], a["bits"], a["block_size"], n, k
            )
            module = next(m for m in onnx_node_modules(node.name) if m.replace("qkv", "q") + ".weight" in weights)
            if module.endswith("qkv_proj"):  # the builder fuses Llama's q, k and v
                w = np.concatenate([weights[module.replace("qkv", p) + ".weight"] for p in "qkv"])
            else:
                w = weights[module + ".weight"]
            assert w.shape == (n, k), node.name
            h = acts.second_moments(onnx_node_modules(node.name), k).astype(np.float64)
            d = (w - q).astype(np.float64)
            errors[node.name] = float(np.einsum("ij,jk,ik->", d, h, d))  # ||(W - Q) X^T||^2 / n
        return errors

    g, p = output_errors(tmp_path / "gptq"), output_errors(tmp_path / "imatrix")
    assert g.keys() == p.keys() and len(g) >= 7
    assert sum(g.values()) < 0.8 * sum(p.values())
    # and node by node, not only on the sum
    assert sum(g[x] < p[x] for x in g) >= 0.8 * len(g)
    manifest_like = json.dumps(report)  # the report is what the manifest carries: JSON as is
    assert "gptq" in manifest_like
