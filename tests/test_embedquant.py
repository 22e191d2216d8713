"""edgekit's quantized token embeddings (formats/onnx_int4/embedquant.py, recipe key `embeddings`):
what onnxruntime's GatherBlockQuantized takes, in .onnx and in ORT format, and the codes edgekit
writes for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekit.formats.onnx_int4 import embedquant, mobile
from edgekit.targets import load_targets

ROWS, HIDDEN = 300, 128


def recipe(**overrides):
    from edgekit.formats import onnx_int4

    return onnx_int4.parse_recipe({**load_targets().format("onnx-int4").recipe, **overrides}, "test [recipe]")


def table(rows=ROWS, hidden=HIDDEN, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, hidden)) * 0.05 + rng.standard_normal((rows, 1)) * 0.01).astype(np.float32)


def one_node(tmp: Path, inits: dict, attrs: dict, data_type=None, zero_points=True) -> Path:
    """A model of one com.microsoft GatherBlockQuantized node over `inits` (codes, scales, zero points)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    codes, scales, zps = inits["codes"], inits["scales"], inits["zps"]
    if data_type is None:
        tensors = [numpy_helper.from_array(codes, "codes")]
    else:  # an ONNX 4-bit tensor (the builder's kind): one code per element, packed by onnx
        tensors = [helper.make_tensor("codes", data_type, list(codes.shape), codes.flatten().tolist())]
    tensors.append(numpy_helper.from_array(scales, "scales"))
    inputs = ["codes", "ids", "scales"]
    if zero_points:
        tensors.append(
            numpy_helper.from_array(zps, "zps")
            if data_type is None
            else helper.make_tensor("zps", data_type, list(zps.shape), zps.flatten().tolist())
        )
        inputs.append("zps")
    node = helper.make_node("GatherBlockQuantized", inputs, ["out"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        tensors,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    path = tmp / "model.onnx"
    onnx.save(model, str(path))
    return path


def run(path: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return session.run(["out"], {"ids": ids})[0]


def codes_of(w: np.ndarray, bits: int, block: int) -> dict:
    from onnx import helper

    node = helper.make_node("Gather", ["emb", "ids"], ["out"], name="/model/embed_tokens/Gather")
    from onnx import numpy_helper

    result = embedquant.quantize_embedding(node, numpy_helper.from_array(w, "emb"), lambda a, b: w[a:b], bits, block)
    arrays = dict(result.tensors)
    return {"codes": arrays[f"emb_Q{bits}G{block}"], "scales": arrays["emb_scale"], "zps": arrays["emb_zp"]}


# relative RMS error of a dequantized table against the float one; measured on table():
# int4 0.076, int8 0.0044
REL_ERROR = {4: 0.12, 8: 0.01}
IDS = np.array([[0, 5, ROWS - 1, 5, 17]], dtype=np.int64)


# --- what onnxruntime 1.32 takes ----------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", ["onnx", "ort"])
def test_uint8_codes_run_in_onnx_and_ort_format_and_equal_numpy(bits, fmt, tmp_path):
    """uint8 data with bits 4 (two codes a byte) or 8: the kernel's output is exactly the numpy
    dequantization of the codes, and the ORT format holds the tensors (they are plain uint8)."""
    block = 32
    w = table()
    q = codes_of(w, bits, block)
    path = one_node(tmp_path, q, dict(bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
    if fmt == "ort":
        ort_path = tmp_path / "model.ort"
        mobile.convert_to_ort(path, ort_path)
        path = ort_path
    got = run(path, IDS)
    want = embedquant.dequantize_embedding(q["codes"], q["scales"], q["zps"], bits, block)[IDS]
    assert got.shape == (1, IDS.shape[1], HIDDEN)
    assert np.array_equal(got, want)
    # and the codes are a quantization of the table (relative RMS error of the rows gathered)
    rel = np.sqrt(np.mean((got - w[IDS]) ** 2) / np.mean(w[IDS] ** 2))
    assert rel < REL_ERROR[bits]


@pytest.mark.parametrize("bits, default_zp", [(4, 8), (8, 128)])
def test_without_zero_points_the_kernel_subtracts_the_midpoint(bits, default_zp, tmp_path):
    q = codes_of(table(), bits, 32)
    path = one_node(tmp_path, q, dict(bits=bits, block_size=32, gather_axis=0, quantize_axis=1), zero_points=False)
    mid = np.full_like(q["zps"], default_zp if bits == 8 else default_zp | (default_zp << 4))
    want = embedquant.dequantize_embedding(q["codes"], q["scales"], mid, bits, 32)[IDS]
    assert np.array_equal(run(path, IDS), want)


def test_an_onnx_int4_tensor_runs_from_onnx_but_not_from_ort_format(tmp_path):
    """The builder's int4 embedding stores an ONNX INT4/UINT4 tensor: onnxruntime 1.32.0 runs it
    from .onnx, but the ORT-format file it writes cannot be loaded back."""
    from onnx import TensorProto

    w = table()
    q = codes_of(w, 4, 32)
    unpacked = {
        "codes": np.stack([q["codes"] & 0x0F, q["codes"] >> 4], axis=-1).reshape(ROWS, HIDDEN),
        "scales": q["scales"],
        "zps": np.stack([q["zps"] & 0x0F, q["zps"] >> 4], axis=-1).reshape(ROWS, -1)[:, : HIDDEN // 32],
    }
    path = one_node(tmp_path, unpacked, dict(block_size=32, gather_axis=0, quantize_axis=1), TensorProto.UINT4)
    want = embedquant.dequantize_embedding(q["codes"], q["scales"], q["zps"], 4, 32)[IDS]
    assert np.array_equal(run(path, IDS), want)
    mobile.convert_to_ort(path, tmp_path / "model.ort")
    with pytest.raises(Exception, match="Invalid ORT format model|Unsupported tensor data type"):
        run(tmp_path / "model.ort", IDS)


def test_uint8_data_needs_gather_axis_0_and_the_last_quantize_axis(tmp_path):
    q = codes_of(table(), 8, 32)
    # scales shaped for blocks along the rows, as the schema's shape check wants them for axis 0
    q = {**q, "scales": np.ones((-(-ROWS // 32), HIDDEN), dtype=np.float32)}
    path = one_node(tmp_path, q, dict(bits=8, block_size=32, gather_axis=0, quantize_axis=0), zero_points=False)
    with pytest.raises(Exception, match="quantize_axis must be the last dimension"):
        run(path, IDS)


# --- edgekit's codes --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_row_chunks_give_the_codes_of_the_whole_table(bits, monkeypatch):
    w = table(rows=1000)
    whole = codes_of(w, bits, 32)
    monkeypatch.setattr(embedquant, "ROW_BYTES", 7 * HIDDEN * 4)  # 7 rows at a time, a ragged last chunk
    chunked = codes_of(w, bits, 32)
    for key in whole:
        assert whole[key].tobytes() == chunked[key].tobytes(), key


def test_shapes_onnxruntime_cannot_take_keep_the_float_embedding():
    from onnx import numpy_helper

    proto = numpy_helper.from_array(np.zeros((4, 96), dtype=np.float32), "emb")  # 3 blocks of 32 a row
    assert embedquant.why_kept(proto, 8, 32) is None
    assert "odd" in embedquant.why_kept(proto, 4, 32)
    assert "not a multiple" in embedquant.why_kept(proto, 8, 64)


def test_recipe_values():
    assert embedquant.embedding_bits(recipe()) is None  # desktop: as built
    assert embedquant.embedding_bits(recipe(mobile=True)) == 8  # phone: int8 without asking
    assert embedquant.embedding_bits(recipe(mobile=True, embeddings="float")) is None
    assert embedquant.embedding_bits(recipe(embeddings="int4")) == 4
    assert embedquant.embedding_bits(recipe(embeddings="int8", algorithm="k_quant_mixed")) == 8
    assert embedquant.embedding_bits(recipe(embeddings="int8", precision="fp32")) is None
    assert recipe(mobile=True).accuracy_level == 4  # int8 activations in MatMulNBits, as phones run them


def test_the_requant_job_runs_for_an_embedding_alone():
    from edgekit.formats.onnx_int4.rewrite import requant_job

    class Ckpt:
        config = {"num_attention_heads": 4, "hidden_size": 64}
        path = Path("/nonexistent")
        trust_remote_code = False

    builder = dict(weight_search="builder", zero_points="integer")
    assert requant_job(Ckpt(), recipe(**builder)) is None
    job = requant_job(Ckpt(), recipe(embeddings="int8", **builder))
    assert job["embedding_bits"] == 8 and job["embedding_block"] == 32


# --- in a bundle ------------------------------------------------------------------------------


def _export(ckpt: Path, out: Path, **keys):
    from test_onnx import RecordingProgress

    from edgekit.checkpoint import resolve
    from edgekit.formats import onnx_int4

    out.mkdir(parents=True)
    return onnx_int4.export(resolve(str(ckpt)), out, recipe(**keys), RecordingProgress())


def _graph(bundle: Path):
    import onnx

    return onnx.load(str(bundle / "model.onnx"))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_a_bundles_embedding_is_the_numpy_dequantization_of_its_codes(bits, tiny_phi3, tmp_path):
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    notes = _export(tiny_phi3, tmp_path / "b", embeddings=f"int{bits}")
    graph = _graph(tmp_path / "b").graph
    inits = {t.name: t for t in graph.initializer}
    [gbq] = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert not any(n.op_type == "Gather" and n.input[0] in inits for n in graph.node)
    # no float table left: the only float tensor of the embedding's is its scales
    assert "model.embed_tokens.weight" not in inits
    assert not any(t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [512, 64] for t in graph.initializer)
    codes, scales, zps = (
        numpy_helper.to_array(inits[x], base_dir=str(tmp_path / "b")) for x in (gbq.input[0], *gbq.input[2:])
    )
    assert codes.dtype == np.uint8 and zps.dtype == np.uint8
    # run the bundle's own node and tensors alone, over every row
    one = tmp_path / "one"
    one.mkdir()
    path = one_node(one, {"codes": codes, "scales": scales, "zps": zps}, {a.name: a.i for a in gbq.attribute})
    ids = np.arange(codes.shape[0], dtype=np.int64)[None]
    got = run(path, ids)[0]
    assert np.array_equal(got, embedquant.dequantize_embedding(codes, scales, zps, bits, 32))
    w = load_file(str(tiny_phi3 / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float32)
    rel = np.sqrt(np.mean((got - w) ** 2) / np.mean(w**2))
    assert rel < REL_ERROR[bits]
    report = notes.quantization["edgekit_requantization"]["embedding"]
    assert report == {"tensor": "model.embed_tokens.weight", "rows": 512, "hidden": 64, "bits": bits, "block_size": 32}
    assert notes.quantization["weights"]["embedding"] == f"int{bits}"
    assert any(f"token embedding quantized by edgekit: int{bits}" in n for n in notes.notes)


@pytest.mark.slow
def test_a_tied_embedding_is_unchanged(tmp_path):
    """Gemma ties its embedding: the builder shares lm_head's codes, and embeddings = "int8" (or a
    phone bundle's "auto") leaves every byte of the model as it was."""
    from edgekit.tiny import make_tiny

    ckpt = make_tiny("gemma2", tmp_path / "gemma2")
    assert json.loads((ckpt / "config.json").read_text()).get("tie_word_embeddings", True)  # Gemma2Config default
    _export(ckpt, tmp_path / "plain")
    notes = _export(ckpt, tmp_path / "int8", embeddings="int8")
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "int8" / name).read_bytes(), name
    assert notes.quantization["edgekit_requantization"]["embedding"]["bits"] is None
    assert "tied" in notes.quantization["edgekit_requantization"]["embedding"]["kept"]


@pytest.mark.slow
def test_the_optimum_path_quantizes_the_embedding_too(tiny_phi3, tmp_path):
    notes = _export(tiny_phi3, tmp_path / "b", engine="optimum", embeddings="int8")
    graph = _graph(tmp_path / "b").graph
    inits = {t.name for t in graph.initializer}
    [gbq] = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    report = notes.quantization["edgekit_requantization"]["embedding"]
    assert report["bits"] == 8 and report["tensor"] not in inits and gbq.input[0] in inits
    assert notes.quantization["weights"]["embedding"] == "int8"
