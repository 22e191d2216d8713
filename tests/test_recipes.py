"""Quantization recipe keys: onnx-int4 weight_search / int8_matmuls (edgekit re-quantization)
and gguf-q4_k_m imatrix (importance matrix from the reference model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import BadInput
from edgekit.formats import gguf_q4km as gguf_fmt
from edgekit.formats import onnx_int4
from edgekit.formats.onnx_int4.recipe import OnnxRecipe, builder_extra_options
from edgekit.formats.onnx_int4.requant import dequantize_matmulnbits, pack_matmulnbits, plan, quantize_blocks
from edgekit.formats.onnx_int4.rewrite import requant_job
from edgekit.progress import NullProgress
from edgekit.targets import load_targets


def onnx_recipe(**overrides) -> OnnxRecipe:
    spec = load_targets().format("onnx-int4")
    return onnx_int4.parse_recipe({**spec.recipe, **overrides}, "test")


# --- onnx-int4 recipe keys ---------------------------------------------------------------------


def test_new_onnx_keys_parse_and_validate():
    r = onnx_recipe(weight_search="edgekit", int8_matmuls=["v_proj", "down_proj"])
    assert r.weight_search == "edgekit" and r.int8_matmuls == ("v_proj", "down_proj")
    # `--set int8_matmuls=k_proj,v_proj` arrives as a string; "" means none
    assert onnx_recipe(int8_matmuls="k_proj, v_proj").int8_matmuls == ("k_proj", "v_proj")
    assert onnx_recipe(int8_matmuls="").int8_matmuls == ()
    assert onnx_recipe(weight_search="gptq").weight_search == "gptq"
    with pytest.raises(BadInput, match="weight_search = 'awq'"):
        onnx_recipe(weight_search="awq")
    with pytest.raises(BadInput, match="int8_matmuls names 'lm_head'"):
        onnx_recipe(int8_matmuls=["lm_head"])
    with pytest.raises(BadInput, match="int8_matmuls"):
        onnx_recipe(int8_matmuls=[8])
    assert onnx_recipe(int8_block_size=128).int8_block_size == 128
    for bad in (48, True, "64"):
        with pytest.raises(BadInput, match="int8_block_size"):
            onnx_recipe(int8_block_size=bad)
    for value in ("integer", "float", "float_matmul"):
        assert onnx_recipe(zero_points=value).zero_points == value
    with pytest.raises(BadInput, match="zero_points = 'fp16' is not allowed"):
        onnx_recipe(zero_points="fp16")
    # float minimums are edgekit's search's; the builder's quantizers write integer zero points
    with pytest.raises(BadInput, match="zero_points = 'float' needs weight_search"):
        onnx_recipe(zero_points="float", weight_search="builder")
    assert onnx_recipe(zero_points="float", weight_search="builder", precision="fp32").precision == "fp32"


def test_defaults_are_the_measured_winners():
    """benchmarks/recipes.py chose these on SmolLM2-135M (see benchmarks/results/recipes.md):
    every layer MatMul int4 with float block minimums, lm_head int8."""
    r = onnx_recipe()
    assert (r.algorithm, r.weight_search, r.int8_matmuls, r.zero_points) == (
        "k_quant_last",
        "imatrix",
        (),
        "float_matmul",
    )
    spec = load_targets().format("gguf-q4_k_m")
    assert gguf_fmt.parse_recipe(spec.recipe, spec.source).imatrix == "calibration"


def test_new_onnx_keys_never_reach_the_builder():
    """They are edgekit's own pass: the builder's extra_options do not change with them."""
    plain = onnx_recipe(weight_search="builder", int8_matmuls=[], zero_points="integer")
    tuned = onnx_recipe(weight_search="imatrix", int8_matmuls=["k_proj", "v_proj", "down_proj"])
    assert builder_extra_options(plain, False) == builder_extra_options(tuned, False)


class FakeCheckpoint:
    def __init__(self, config, path="/nowhere"):
        self.config, self.path, self.trust_remote_code = config, Path(path), False


def test_requant_job():
    cfg = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    keep = dict(weight_search="builder", int8_matmuls=[], int8_block_size=0, zero_points="integer")
    assert requant_job(FakeCheckpoint(cfg), onnx_recipe(**keep)) is None
    assert requant_job(FakeCheckpoint(cfg), onnx_recipe(precision="fp32", weight_search="imatrix")) is None
    job = requant_job(FakeCheckpoint(cfg), onnx_recipe(**{**keep, "int8_matmuls": ["v_proj"]}))
    assert job["qkv_sizes"] == [576, 192, 192] and job["int8"] == ["v_proj"] and job["weight_search"] == "builder"
    assert job["int8_block_size"] == 0
    assert requant_job(FakeCheckpoint(cfg), onnx_recipe(**{**keep, "int8_block_size": 64}))["int8_block_size"] == 64
    job = requant_job(FakeCheckpoint({**cfg, "head_dim": 32}), onnx_recipe(weight_search="imatrix"))
    assert job["qkv_sizes"] == [288, 96, 96]


def test_plan_splits_a_fused_qkv_by_width():
    qkv = [576, 192, 192]
    node = "/model/layers.3/attn/qkv_proj/MatMul"
    assert plan(node, 960, 4, ["v_proj"], qkv) == [("qk", 0, 768, 4), ("v", 768, 960, 8)]
    assert plan(node, 960, 4, ["k_proj", "v_proj"], qkv) == [("q", 0, 576, 4), ("kv", 576, 960, 8)]
    assert plan(node, 960, 8, ["v_proj"], qkv) == [("", 0, 960, 8)]  # already int8: whole
    assert plan(node, 960, 4, ["qkv_proj"], qkv) == [("", 0, 960, 8)]
    assert plan(node, 960, 4, ["v_proj"], [576, 192, 100]) == [("", 0, 960, 4)]  # sizes disagree
    assert plan("/model/layers.0/self_attn/v_proj/MatMul", 192, 4, ["v_proj"], qkv) == [("", 0, 192, 8)]
    assert plan("/model/layers.0/mlp/down_proj/MatMul", 576, 4, ["v_proj"], qkv) == [("", 0, 576, 4)]
    assert plan("/lm_head/MatMul", 100, 8, ["down_proj"], qkv) == [("", 0, 100, 8)]


# --- the quantizer against the MatMulNBits kernel ---------------------------------------------


def _kernel_weight(b, s, z, k, n, bits, block):
    """What onnxruntime's MatMulNBits computes with these initializers, as a [N, K] matrix."""
    from ortnode import matmulnbits_session

    sess = matmulnbits_session(b, s, z, k, n, bits, block, accuracy_level=4)
    return sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T


@pytest.mark.parametrize(
    "k, n, bits, block",
    [(128, 24, 4, 32), (96, 16, 4, 32), (80, 8, 4, 32), (96, 16, 8, 32), (100, 6, 4, 16), (576, 8, 4, 64)],
)
def test_packing_matches_the_kernel(k, n, bits, block):
    """Odd block counts and a K that is not a multiple of the block (padded) included:
    onnxruntime's own rtn/k_quant cannot pack an odd block count (576 / 64 = 9)."""
    w = np.random.default_rng(k + n + bits).standard_normal((n, k)).astype(np.float32)
    q, s, z = quantize_blocks(w, bits, block)
    b, s, z = pack_matmulnbits(q, s, z, bits)
    got = _kernel_weight(b, s, z, k, n, bits, block)
    np.testing.assert_allclose(dequantize_matmulnbits(b, s, z, bits, block, n, k), got, atol=1e-6)
    rms = float(np.sqrt(np.mean((got - w) ** 2)))
    assert rms < (0.1 if bits == 4 else 0.006)


def test_search_beats_rtn_and_k_quant_and_keeps_constant_blocks_exact():
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor, quant_tensor_k_quant_cpu

    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)

    def mse(q, s, z):
        return float(np.mean((((q.astype(np.float64) - z) * s).reshape(w.shape) - w) ** 2))

    q, s, z = quantize_blocks(w, 4, 32)
    mine = mse(q, s[..., None], z[..., None])
    rtn = mse(*quant_tensor(w, 4, 32, "asym", "uint"))  # min-max asymmetric RTN
    kq = mse(*quant_tensor_k_quant_cpu(w, 4, 32))  # the builder's k_quant
    assert mine < 0.95 * rtn and mine < 0.95 * kq

    const = np.full((2, 64), -0.37, dtype=np.float32)
    const[1] = 0.0
    for bits in (4, 8):
        q, s, z = quantize_blocks(const, bits, 32)
        np.testing.assert_allclose(
            (q.astype(np.float32) - z[..., None]) * s[..., None], const.reshape(2, 2, 32), atol=1e-7
        )


@pytest.mark.parametrize("zero_points", ["integer", "float", "float_matmul"])
@pytest.mark.parametrize("k, block", [(96, 32), (576, 64), (100, 16)])
def test_requantized_node_computes_its_dequantized_weight(zero_points, k, block):
    """requantize_node on a one-MatMulNBits graph, each zero_points form, run by onnxruntime on
    a rank-3 input (as in the builder's graphs): x @ W.T for the W the search chose, with float
    minimums on both float forms (a K that is not a multiple of the block keeps integer zero
    points in float_matmul: its block sums need whole blocks)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.formats.onnx_int4.nodequant import requantize_node
    from edgekit.formats.onnx_int4.requant import block_minimums

    n = 24
    rng = np.random.default_rng(k)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.1, 2.0, (n, 1)) + rng.normal(0, 0.5, (n, 1))).astype(np.float32)
    b, s, z = pack_matmulnbits(*quantize_blocks(w, 4, block), 4)  # the builder's codes, to be replaced
    inits = {t.name: t for t in (numpy_helper.from_array(b, "B"), numpy_helper.from_array(s.astype(np.float32), "S"))}
    base = "/model/layers.0/mlp/up_proj/MatMul"
    node = helper.make_node(
        "MatMulNBits",
        ["X", "B", "S"],
        ["Y"],
        name=base + "_Q4",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
        accuracy_level=0,  # fp32 activations: 4 (int8 activations) would blur the comparison
    )
    source = type("Source", (), {"weight_for": lambda self, base_, n_, k_: w})()
    spec = {"weight_search": "edgekit", "zero_points": zero_points, "int8": []}
    result = requantize_node(node, inits.get, {"B": 1, "S": 1}, source, spec, None, None)
    tensors = dict(result.tensors)
    graph = helper.make_graph(
        list(result.nodes),
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, None, n])],
        [numpy_helper.from_array(a, name) for name, a in result.tensors],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 7, k)).astype(np.float32)
    q, scale, zp = quantize_blocks(w, 4, block, zero_points="integer" if zero_points == "integer" else "float")
    whole = k % block == 0
    if zero_points == "float_matmul" and whole:
        mq = pack_matmulnbits(q, scale, zp, 4)[0]
        assert not any(name.endswith("_zp") for name in tensors)  # symmetric codes: no zero_points input
        np.testing.assert_array_equal(tensors["B"], mq)
        mins = next(a for name, a in tensors.items() if name.endswith("_min"))
        np.testing.assert_array_equal(mins, block_minimums(scale, zp, 4))
    if zero_points == "float_matmul" and not whole:
        q, scale, zp = quantize_blocks(w, 4, block)
    dq = dequantize_matmulnbits(*pack_matmulnbits(q, scale, zp, 4), 4, block, n, k)
    expected = x.astype(np.float64) @ dq.astype(np.float64).T
    got = sess.run(None, {"X": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))
    # the float forms store what the search chose: closer to w than integer zero points
    if zero_points != "integer" and whole:
        qi, si, zi = quantize_blocks(w, 4, block)
        integer = dequantize_matmulnbits(*pack_matmulnbits(qi, si, zi, 4), 4, block, n, k)
        assert np.mean((dq - w) ** 2) < np.mean((integer - w) ** 2)


# --- imatrix ---------------------------------------------------------------------------------


def test_calibration_text_is_not_the_eval_text():
    from edgekit.imatrix import calibration_text
    from edgekit.reference import default_eval_text

    cal, ev = calibration_text(), default_eval_text()
    assert len(cal) > 3000
    assert not (set(cal.split("\n\n")) & set(ev.split("\n\n")))


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_phi3):
    from edgekit.checkpoint import resolve
    from edgekit.imatrix import load_or_compute

    ck = resolve(str(tiny_phi3))
    return ck, load_or_compute(ck)


@pytest.mark.slow
def test_imatrix_from_the_reference_model(tiny_imatrix):
    from edgekit.imatrix import load_or_compute

    ck, im = tiny_imatrix
    cfg = ck.config
    assert im.tokens > 500
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    assert len(im.values["model.layers.0.self_attn.qkv_proj"]) == hidden
    assert len(im.values["model.layers.0.mlp.down_proj"]) == inter
    assert len(im.values["lm_head"]) == hidden
    assert all(np.all(v >= 0) and np.isfinite(v).all() and v.dtype == np.float32 for v in im.values.values())
    again = load_or_compute(ck)
    assert again.cached and again.key == im.key
    assert all(np.array_equal(again.values[k], im.values[k]) for k in im.values)


@pytest.mark.slow
def test_imatrix_maps_to_onnx_nodes(tiny_imatrix):
    from edgekit.imatrix import onnx_node_importance

    ck, im = tiny_imatrix
    hidden, inter = ck.config["hidden_size"], ck.config["intermediate_size"]
    qkv = im.values["model.layers.1.self_attn.qkv_proj"]
    for node in ("/model/layers.1/attn/qkv_proj/MatMul_Q4", "/model/layers.1/attn/v_proj/MatMul_Q8"):
        assert onnx_node_importance(im, node, hidden) is qkv
    gate_up = im.values["model.layers.1.mlp.gate_up_proj"]
    assert onnx_node_importance(im, "/model/layers.1/mlp/up_proj/MatMul_Q4", hidden) is gate_up
    assert (
        onnx_node_importance(im, "/model/layers.1/mlp/down_proj/MatMul", inter)
        is im.values["model.layers.1.mlp.down_proj"]
    )
    assert onnx_node_importance(im, "/model/layers.1/mlp/down_proj/MatMul", inter + 1) is None  # K must agree
    assert onnx_node_importance(im, "/lm_head/MatMul_Q8", hidden) is im.values["lm_head"]


@pytest.mark.slow
def test_imatrix_maps_to_gguf_tensor_names(tiny_imatrix):
    from edgekit.imatrix import gguf_entries

    ck, im = tiny_imatrix
    hidden, inter = ck.config["hidden_size"], ck.config["intermediate_size"]
    rows = {}
    for i in range(ck.config["num_hidden_layers"]):
        rows.update(
            {
                f"blk.{i}.attn_qkv.weight": hidden,
                f"blk.{i}.attn_output.weight": hidden,
                f"blk.{i}.ffn_up.weight": hidden,
                f"blk.{i}.ffn_down.weight": inter,
            }
        )
    rows["output.weight"] = hidden
    rows["blk.1.ffn_down.weight"] = inter + 32  # a row length that disagrees is left out
    entries, unmatched = gguf_entries(im, "phi3", ck.config["num_hidden_layers"], rows)
    assert entries["blk.0.attn_qkv.weight"] is im.values["model.layers.0.self_attn.qkv_proj"]
    assert entries["blk.0.ffn_up.weight"] is im.values["model.layers.0.mlp.gate_up_proj"]
    assert entries["blk.0.ffn_down.weight"] is im.values["model.layers.0.mlp.down_proj"]
    assert entries["output.weight"] is im.values["lm_head"]
    assert "blk.1.ffn_down.weight" not in entries and "model.layers.1.mlp.down_proj" in unmatched
    assert gguf_entries(im, "no-such-arch", 2, rows)[0] == {}


# --- gguf-q4_k_m imatrix key -------------------------------------------------------------------


def test_gguf_imatrix_key():
    assert gguf_fmt.parse_recipe({"imatrix": "calibration"}, "t").imatrix == "calibration"
    assert gguf_fmt.parse_recipe({}, "t").imatrix == "none"
    with pytest.raises(BadInput, match="imatrix must be one of"):
        gguf_fmt.parse_recipe({"imatrix": "wikitext"}, "t")


@pytest.mark.slow
def test_gguf_export_hands_the_imatrix_to_llama_model_quantize(tiny_phi3, tmp_path):
    from edgekit.checkpoint import resolve

    ck = resolve(str(tiny_phi3))
    (tmp_path / "plain").mkdir()
    (tmp_path / "tuned").mkdir()
    plain = gguf_fmt.export(ck, tmp_path / "plain", gguf_fmt.parse_recipe({"imatrix": "none"}, "t"), NullProgress())
    tuned = gguf_fmt.export(
        ck, tmp_path / "tuned", gguf_fmt.parse_recipe({"imatrix": "calibration"}, "t"), NullProgress()
    )
    assert "imatrix" not in plain.quantization
    info = tuned.quantization["imatrix"]
    # every linear but none twice: 2 layers x (qkv, o, gate_up, down) + the untied lm_head
    assert info["tensors"] == 2 * 4 + 1 and info["unmatched_modules"] == []
    assert info["accepted_by_llama_cpp"] == info["tensors"]  # llama.cpp's own count of what it received
    assert plain.quantization["tensor_types"] == tuned.quantization["tensor_types"]  # same mix, other rounding
    assert (tmp_path / "plain" / "model.gguf").read_bytes() != (tmp_path / "tuned" / "model.gguf").read_bytes()
    assert any("importance matrix" in n for n in tuned.notes)
    with gguf_fmt.open_session(tmp_path / "tuned", {}) as s:
        assert s.logits(s.encode("The capital of France is")).shape[0] == len(s.encode("The capital of France is"))


# --- onnx-int4 re-quantization end to end (tiny Phi-3) -----------------------------------------


@pytest.fixture(scope="module")
def requantized(tiny_phi3, tmp_path_factory):
    from edgekit.checkpoint import resolve

    out = tmp_path_factory.mktemp("rq") / "bundle"
    out.mkdir()
    recipe = onnx_recipe(weight_search="imatrix", int8_matmuls=["v_proj", "down_proj"], algorithm="k_quant")
    return out, onnx_int4.export(resolve(str(tiny_phi3)), out, recipe, NullProgress())


@pytest.mark.slow
def test_requantized_bundle(requantized, tiny_phi3):
    import onnx

    out, notes = requantized
    report = notes.quantization["edgekit_requantization"]
    layers = json.loads((tiny_phi3 / "config.json").read_text())["num_hidden_layers"]
    assert report["requantized"] == 5 * layers + 1 and report["kept"] == [] and report["imatrix_missing"] == []
    assert report["split"] == layers  # q,k int4 | v int8 in every fused qkv_proj
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"
    }
    assert (
        bits["/model/layers.0/attn/qkv_proj/MatMul_qk_Q4"] == 4
        and bits["/model/layers.0/attn/qkv_proj/MatMul_v_Q8"] == 8
    )
    assert bits["/model/layers.0/mlp/down_proj/MatMul_Q8"] == 8 and bits["/model/layers.0/mlp/up_proj/MatMul_Q4"] == 4
    assert notes.quantization["weights"]["matmul_int8"] == 2 * layers  # v and down; lm_head int4 (k_quant)
    assert any("split by width" in n for n in notes.notes)


def _kld(ref, got):
    from edgekit.metrics import log_softmax

    lr, lg = log_softmax(ref), log_softmax(got)
    return float((np.exp(lr) * (lr - lg)).sum(-1).mean())


@pytest.mark.slow
def test_requantized_bundle_is_closer_to_the_reference(requantized, tiny_phi3, tmp_path):
    """Teacher-forced KLD against transformers' fp32 logits: the re-quantized bundle beats the
    builder's own k_quant bundle (a random tiny model is fragile, so the margin is relative)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekit.checkpoint import resolve

    text = "The capital of France is Paris, and the river that runs through it is the Seine."
    ids = AutoTokenizer.from_pretrained(str(tiny_phi3))(text, add_special_tokens=False).input_ids
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_phi3), dtype=torch.float32)(torch.tensor([ids])).logits[0]
    ref = ref.detach().numpy()
    plain = tmp_path / "plain"
    plain.mkdir()
    onnx_int4.export(
        resolve(str(tiny_phi3)),
        plain,
        onnx_recipe(
            weight_search="builder", int8_matmuls=[], int8_block_size=0, algorithm="k_quant", zero_points="integer"
        ),
        NullProgress(),
    )
    klds = {}
    for name, bundle in (("builder", plain), ("edgekit", requantized[0])):
        session = onnx_int4.open_session(bundle, {}, threads=1)
        try:
            klds[name] = _kld(ref, session.logits(ids)[:, : ref.shape[-1]])
        finally:
            session.close()
    assert klds["edgekit"] < 0.8 * klds["builder"], klds


@pytest.mark.slow
def test_fallback_path_requantizes_the_same_way(tiny_phi3, tmp_path, requantized):
    """optimum's graph keeps Phi-3's fused qkv_proj too: the same split, the same widths."""
    from edgekit.checkpoint import resolve

    out = tmp_path / "fallback"
    out.mkdir()
    recipe = onnx_recipe(
        engine="optimum", weight_search="imatrix", int8_matmuls=["v_proj", "down_proj"], algorithm="k_quant"
    )
    notes = onnx_int4.export(resolve(str(tiny_phi3)), out, recipe, NullProgress())
    report = notes.quantization["edgekit_requantization"]
    built = requantized[1].quantization
    weights = notes.quantization["weights"]
    assert report["kept"] == [] and report["imatrix_missing"] == []
    # optimum keeps Phi-3's gate_up_proj fused (one MatMul where the builder has two); every
    # quantized MatMul was re-searched, minus the split's extra node
    assert report["requantized"] == weights["matmul_int4"] + weights["matmul_int8"] - report["split"]
    assert report["split"] == built["edgekit_requantization"]["split"]
    assert weights["matmul_int8"] == built["weights"]["matmul_int8"]


def test_recipes_benchmark_defaults_section():
    """benchmarks/recipes.py --models: one default row per target, and a section that states
    per model its figures against its own gguf default, failures included, and what the
    checkpoints are (dequantized 4-bit GGUFs)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import recipes as bench

    chosen = bench.default_candidates()
    assert sorted(target for _, target, _, _ in chosen) == ["gguf-q4_k_m", "onnx-int4"]
    assert bench.MODELS.split(",") == ["smollm2-135m", "gemma3-270m"]

    def row(model, target, kld, size, **extra):
        return dict(
            model=model,
            target=target,
            name=f"{target} default",
            date="2026-12-07",
            load_before=2.0,
            load_after=3.0,
            kld_mean=kld,
            top1_agreement=0.9,
            ppl_ratio=1.01,
            model_bytes=size,
            export_s=12.0,
            decode_tok_s=50.0,
            **extra,
        )

    doc = {
        "models": ["smollm2-135m", "gemma3-270m"],
        "eval_tokens": {"smollm2-135m": 896, "gemma3-270m": 800},
        "host_line": "a host",
        "rows": [
            row("smollm2-135m", "gguf-q4_k_m", 0.04, 2**20 * 100),
            row("smollm2-135m", "onnx-int4", 0.01, 2**20 * 110),
            row("gemma3-270m", "gguf-q4_k_m", 0.02, 2**20 * 200),
            {**row("gemma3-270m", "onnx-int4", None, None), "error": "ToolFailed: builder says no"},
        ],
    }
    md = bench.defaults_markdown(doc)
    lines = [line for line in md.splitlines() if line.startswith("| smollm2") or line.startswith("| gemma3")]
    assert len(lines) == 4
    assert "| 110.0 | 0.0100 |" in lines[1] and "| 0.25 | 1.10 |" in lines[1]  # against smollm2's own gguf
    assert "| 200.0 | 0.0200 |" in lines[2] and "| 1.00 | 1.00 |" in lines[2]
    assert "failed: ToolFailed: builder says no" in lines[3]
    assert "Q4_1" in md and "Q4_K_M" in md and "favours the gguf format" in md
    # SmolLM2 not measured by --models: its rows come from the main table's default rows, marked so.
    main = {"date": "2026-12-07", "eval_tokens": 896, "rows": [{**doc["rows"][0], "default": True}]}
    gemma_only = {**doc, "models": ["gemma3-270m"], "rows": doc["rows"][2:]}
    md = bench.defaults_markdown(gemma_only, main)
    assert "| smollm2-135m (896 tokens) | gguf-q4_k_m | gguf-q4_k_m default (main table) |" in md
    assert md.index("smollm2-135m (896") < md.index("gemma3-270m (800")
