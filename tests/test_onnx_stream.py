"""Streamed onnx-int4 export (formats/onnx_int4/stream.py) against the whole-model builder path.

The streamed path builds a 3-layer template with the genai builder and grows it to N layers; a
bundle it writes must be the builder path's byte for byte, so the parity and reproducibility
tests of the builder path hold for it by construction. Checked on tiny checkpoints made 9
layers deep (with k_quant_mixed, layers 0, 1, 3, 6 and 8 are raised to int8, so both template
variants are used), every layer with its own random values.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgekit.checkpoint import resolve
from edgekit.formats import onnx_int4
from edgekit.formats.onnx_int4.expand import TEMPLATE_LAYERS, more_bits_layers, renamed
from edgekit.formats.onnx_int4.nodequant import ordered_map
from edgekit.formats.onnx_int4.stream import STREAMED, WHOLE_MODEL, why_not_streamed
from edgekit.targets import load_targets

DEPTH = 9
FAMILIES = ["llama", "mistral", "qwen2", "phi3", "phi3-longrope", "phi4-mini", "phi3-medium"]
MIXED = "k_quant_mixed"  # raises llama.cpp's use_more_bits layers to int8: two template variants


class Progress:
    @contextmanager
    def step(self, name, total=None):
        yield SimpleNamespace(advance=lambda n=1: None, update=lambda c, t=None: None)

    def note(self, text):
        pass


def recipe(**overrides):
    spec = load_targets().format("onnx-int4")
    return onnx_int4.parse_recipe({**spec.recipe, **overrides}, "test")


def deepen(src: Path, out: Path, layers: int, zero_bias_layers: tuple[int, ...] = (), seed: int = 1) -> Path:
    """A copy of a tiny checkpoint with `layers` layers, each with its own random values."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != "config.json":
            shutil.copy2(p, out / p.name)
    cfg = json.loads((src / "config.json").read_text())
    n0 = cfg["num_hidden_layers"]
    cfg["num_hidden_layers"] = layers
    for key, value in list(cfg.items()):  # per-layer lists (layer_types) follow the depth
        if isinstance(value, list) and len(value) == n0:
            cfg[key] = [value[i % n0] for i in range(layers)]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    last = f"model.layers.{n0 - 1}."
    for name in sorted(n for n in tensors if n.startswith(last)):
        t = tensors[name]
        for i in range(layers):
            new = t.float() + 0.2 * torch.randn(t.shape, generator=g)
            if i in zero_bias_layers and name.endswith(".bias"):
                new = torch.zeros_like(new)
            tensors[name.replace(last, f"model.layers.{i}.")] = new.to(t.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def export(ckpt: Path, out: Path, whole_model: bool = False, **overrides):
    out.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        if whole_model:
            # the module, not the package's export() that shadows its name
            module = importlib.import_module("edgekit.formats.onnx_int4.export")
            mp.setattr(module, "why_not_streamed", lambda *a: "forced by the test")
        notes = onnx_int4.export(resolve(str(ckpt)), out, recipe(**overrides), Progress())
    return out, notes


def digests(bundle: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundle.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    from edgekit.tiny import make_tiny

    made: dict[str, Path] = {}

    def get(family: str, **kw) -> Path:
        key = family + repr(sorted(kw.items()))
        if key not in made:
            root = tmp_path_factory.mktemp("deep")
            made[key] = deepen(make_tiny(family, root / "tiny"), root / f"{family}-{DEPTH}", DEPTH, **kw)
        return made[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_bundle_is_the_builder_paths_byte_for_byte(family, deep, tmp_path):
    ckpt = deep(family)
    # k_quant_mixed (not the default) so that both template variants are cloned
    streamed, s_notes = export(ckpt, tmp_path / "streamed", algorithm=MIXED)
    whole, w_notes = export(ckpt, tmp_path / "whole", whole_model=True, algorithm=MIXED)
    assert s_notes.quantization["path_taken"] == STREAMED
    assert w_notes.quantization["path_taken"] == WHOLE_MODEL
    assert any(n.startswith("streamed export:") for n in s_notes.notes)
    assert digests(streamed) == digests(whole)
    # the manifest's record of the re-quantization is the same too (the path is recorded beside it)
    assert s_notes.quantization["edgekit_requantization"] == w_notes.quantization["edgekit_requantization"]
    assert s_notes.quantization["edgekit_requantization"]["requantized"] >= DEPTH * 5


@pytest.mark.slow
@pytest.mark.parametrize("family, zero_points", [("llama", "float"), ("phi3", "float_matmul")])
def test_streamed_bundle_with_float_minimums_is_the_builder_paths_byte_for_byte(family, zero_points, deep, tmp_path):
    """Float block minimums on both paths, beside int8 MatMuls (which keep integer zero
    points) and, in Phi-3's fused qkv_proj, a split by width (two int4 runs, one int8)."""
    import onnx

    ckpt = deep(family)
    keys = dict(zero_points=zero_points, weight_search="imatrix", int8_matmuls=["v_proj", "down_proj"])
    streamed, s_notes = export(ckpt, tmp_path / "streamed", **keys)
    whole, w_notes = export(ckpt, tmp_path / "whole", whole_model=True, **keys)
    assert s_notes.quantization["path_taken"] == STREAMED
    assert digests(streamed) == digests(whole)
    assert s_notes.quantization["edgekit_requantization"]["zero_points"] == zero_points
    graph = onnx.load(str(streamed / "model.onnx"), load_external_data=False).graph
    dtype = {t.name: t.data_type for t in graph.initializer}
    zp_types: dict[int, set] = {4: set(), 8: set()}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits = next(a.i for a in node.attribute if a.name == "bits")
            zp_types[bits].add(dtype[node.input[3]] if len(node.input) > 3 and node.input[3] else None)
    assert zp_types[8] == {onnx.TensorProto.UINT8}
    if zero_points == "float":
        assert zp_types[4] == {onnx.TensorProto.FLOAT}
    else:  # symmetric int4 codes, the minimums in one float MatMul per int4 run
        assert zp_types[4] == {None}
        sides = [n for n in graph.node if n.name.endswith("/BlockMinimums/MatMul")]
        int4 = [n for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) == 3]
        assert len(sides) == len(int4) > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_streamed_gptq_bundle_is_the_builder_paths_byte_for_byte(family, deep, tmp_path, monkeypatch):
    """weight_search = "gptq": both paths read the same cached calibration inputs per node
    (Llama's q/k/v fused by the builder, Phi-3's already fused), so the codes are the same."""
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    ckpt = deep(family)
    streamed, s_notes = export(ckpt, tmp_path / "streamed", weight_search="gptq")
    whole, w_notes = export(ckpt, tmp_path / "whole", whole_model=True, weight_search="gptq")
    assert s_notes.quantization["path_taken"] == STREAMED
    assert digests(streamed) == digests(whole)
    report = s_notes.quantization["edgekit_requantization"]
    assert report == w_notes.quantization["edgekit_requantization"]
    assert report["weight_search"] == "gptq" and report["imatrix_missing"] == []
    assert report["activations"]["modules"] >= DEPTH * 4 and report["requantized"] >= DEPTH * 4


@pytest.mark.slow
@pytest.mark.parametrize("embeddings", ["int8", "int4"])
def test_streamed_bundle_with_a_quantized_embedding_is_the_builder_paths_byte_for_byte(embeddings, deep, tmp_path):
    """edgekit's embedding codes (embedquant.py): the streamed path reads the float table from the
    template in row chunks and writes the codes where the builder path's requantize() does."""
    import onnx

    ckpt = deep("phi3")
    streamed, s_notes = export(ckpt, tmp_path / "streamed", embeddings=embeddings)
    whole, w_notes = export(ckpt, tmp_path / "whole", whole_model=True, embeddings=embeddings)
    assert s_notes.quantization["path_taken"] == STREAMED
    assert digests(streamed) == digests(whole)
    report = s_notes.quantization["edgekit_requantization"]
    assert report == w_notes.quantization["edgekit_requantization"]
    assert report["embedding"]["bits"] == int(embeddings[3:])
    graph = onnx.load(str(streamed / "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    assert "model.embed_tokens.weight" not in {t.name for t in graph.initializer}


@pytest.mark.slow
def test_streamed_bundle_runs_in_plain_genai(deep, tmp_path):
    import numpy as np
    import onnxruntime_genai as og

    bundle, _ = export(deep("phi4-mini"), tmp_path / "b")
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([1, 5, 9, 20], dtype=np.int32))
    logits = np.asarray(gen.get_output("logits"))
    assert logits.shape[-1] == json.loads((bundle / "genai_config.json").read_text())["model"]["vocab_size"]
    assert np.isfinite(logits).all()


@pytest.mark.slow
def test_a_layer_built_unlike_the_template_takes_the_whole_model_path(deep, tmp_path):
    # The builder leaves out the Add of an all-zero bias: layer 4 has one, no template layer does.
    ckpt = deep("qwen2", zero_bias_layers=(4,))
    bundle, notes = export(ckpt, tmp_path / "b")
    assert notes.quantization["path_taken"] == WHOLE_MODEL
    assert any("streamed export not possible" in n and "layer 4" in n for n in notes.notes)
    whole, _ = export(ckpt, tmp_path / "whole", whole_model=True)
    assert digests(bundle) == digests(whole)
    assert not (tmp_path / "b-onnx-work").exists()


def test_refusals_name_the_reason():
    cfg = {"num_hidden_layers": 30}
    assert why_not_streamed("LlamaForCausalLM", cfg, recipe()) is None
    builder = recipe(weight_search="builder", zero_points="integer")
    assert "builder's own quantization" in why_not_streamed("LlamaForCausalLM", cfg, builder)
    assert "sliding" in why_not_streamed("Gemma3ForCausalLM", cfg, recipe())
    assert "not in the streaming table" in why_not_streamed("OlmoForCausalLM", cfg, recipe())
    small = why_not_streamed("LlamaForCausalLM", {"num_hidden_layers": TEMPLATE_LAYERS}, recipe())
    assert small and "as small as the template" in small


def test_more_bits_layers_is_the_builders_rule():
    from onnxruntime_genai.models.builders.base import Model

    for n in (3, 9, 16, 30, 32, 40):
        fake = SimpleNamespace(num_layers=n)
        Model.make_matmul_mixed_precision(fake, {"mixed_layers": "int8"})
        raised = {int(k.split(".")[1].split("/")[0]) for k in fake.int4_customized_weight_config}
        assert raised == more_bits_layers(n), n


def test_renaming_touches_layer_numbers_only():
    m = {1: 7, 0: 6}
    assert renamed("/model/layers.1/attn/qkv_proj/MatMul_Q4", m) == "/model/layers.7/attn/qkv_proj/MatMul_Q4"
    assert (
        renamed("/model/layers.0/mlp/down_proj/MatMul/output_0", m) == "/model/layers.6/mlp/down_proj/MatMul/output_0"
    )
    assert renamed("past_key_values.1.key", m) == "past_key_values.7.key"
    assert renamed("present.1.value", m) == "present.7.value"
    assert renamed("model.layers.10.x", m) == "model.layers.10.x"
    assert renamed("/model/constants/INT64/[1]", m) == "/model/constants/INT64/[1]"


def test_ordered_map_keeps_order_on_two_threads_with_few_in_flight():
    running, peak, lock = 0, 0, threading.Lock()
    threads = set()

    def work(i):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        time.sleep(0.01 * (i % 3))
        with lock:
            running -= 1
        return i * i

    assert list(ordered_map(work, range(20))) == [i * i for i in range(20)]
    assert peak <= 2 and len(threads) == 2


def test_the_template_skips_the_search_only_when_edgekit_searches_every_code():
    from edgekit.formats.onnx_int4.recipe import builder_extra_options
    from edgekit.formats.onnx_int4.stream import template_options

    untied = {"tie_word_embeddings": False}
    opts = builder_extra_options(recipe(algorithm="k_quant_mixed"), False)  # an int8 placement to keep
    cheap = template_options(opts, "imatrix", untied)
    assert cheap is not None and cheap["algo_config"] == "rtn" and cheap["is_symmetric"] == "false"
    # the int8 placement shapes the graph: it stays
    assert cheap["matmul_mixed_precision"] == "last_matmul:int8,mixed_layers:int8"
    assert {k: v for k, v in cheap.items() if k not in ("algo_config", "is_symmetric", "matmul_mixed_precision")} == {
        k: v for k, v in opts.items() if k not in ("algo_config", "is_symmetric")
    }
    assert template_options(opts, "edgekit", untied) == cheap
    plain = template_options(builder_extra_options(recipe(algorithm="k_quant"), False), "edgekit", untied)
    assert plain is not None and "matmul_mixed_precision" not in plain  # no int8 placement to keep
    assert template_options(opts, "builder", untied) is None  # the builder's codes are the bundle's
    for cheap_already in ("default", "rtn", "rtn_last"):
        assert (
            template_options(builder_extra_options(recipe(algorithm=cheap_already), False), "imatrix", untied) is None
        )
    # tied embeddings: the lm_head keeps the builder's codes (shared with the embedding)
    assert template_options(opts, "imatrix", {"tie_word_embeddings": True}) is None
    assert template_options(opts, "imatrix", {}) is None  # transformers' default ties
    assert template_options(opts, "imatrix", {"text_config": untied}) == cheap


@pytest.mark.slow
def test_a_node_keeping_the_builders_codes_gets_the_recipes_template(deep, tmp_path, monkeypatch, capsys):
    """Every MatMul outside the cloned layers is made to keep the builder's codes (MISMATCH < 0:
    no checkpoint tensor "matches" its node). The cheap template is then rebuilt with the
    recipe's algorithm, and the bundle is the one the recipe's template gives; kept from the
    cheap template, those codes would differ (so the algorithm does matter there)."""
    from edgekit.formats.onnx_int4 import filling, nodequant, stream
    from edgekit.formats.onnx_int4.recipe import ALGORITHMS, builder_extra_options
    from edgekit.formats.onnx_int4.rewrite import requant_job

    ckpt = resolve(str(deep("llama")))
    # no imatrix pass: the template is what is under test; k_quant_mixed, a searching algorithm
    r = recipe(weight_search="edgekit", algorithm="k_quant_mixed")

    def streamed(name: str) -> tuple[dict[str, str], dict]:
        out = tmp_path / name
        out.mkdir()
        job = {
            "input": str(ckpt.path),
            "output": str(out),
            "cache_dir": str(tmp_path / "cache"),
            "extra_options": builder_extra_options(r, False),
            "precision": "int4",
            "requant": requant_job(ckpt, r),
            "template": str(tmp_path / f"{name}-template"),
            "mixed_layers": "mixed_layers" in ALGORITHMS[r.algorithm][1],
        }
        report = stream.child_stream(job, lambda job: pytest.fail("took the whole-model path"))
        assert report["path_taken"] == STREAMED
        return {k: v for k, v in digests(out).items() if k.startswith("model.onnx")}, report

    monkeypatch.setattr(nodequant, "MISMATCH", -1.0)
    retried, report = streamed("retried")
    assert "rebuilding the template with k_quant_mixed" in capsys.readouterr().out
    assert any("does not match" in k for k in report["kept"]) and report["requantized"] > 0

    released = []
    with monkeypatch.context() as m:
        m.setattr(stream, "template_options", lambda *a: None)
        m.setattr(filling, "release_memory", lambda: released.append(1))
        recipes, report = streamed("recipes")
    assert retried == recipes
    # the writer hands memory back every RELEASE_EVERY MatMuls it writes (kept ones included)
    matmuls = report["requantized"] + len(report["kept"])
    assert len(released) == matmuls // filling.RELEASE_EVERY > 0

    with monkeypatch.context() as m:  # the cheap template's codes let through
        init = filling.Filler.__init__
        m.setattr(filling.Filler, "__init__", lambda self, *a: init(self, *a[:3], True))
        cheap, _ = streamed("cheap")
    assert cheap["model.onnx.data"] != recipes["model.onnx.data"]


def _weight_with_odd_blocks(k: int = 256, n: int = 3000):
    """A MatMul B [K, N] (as the builder quantizes it) with zero, constant and tiny blocks."""
    import numpy as np

    w = (np.random.default_rng(3).standard_normal((k, n)) * 0.02).astype(np.float32)
    w[:32, 5] = 0.0
    w[64:96, 7] = 0.5
    w[:, 11] = 1e-30
    return w


@pytest.mark.parametrize("bits", [4, 8])
def test_chunked_k_quant_is_the_builders_search_byte_for_byte(bits):
    """templatequant.chunked_k_quant (the template's k_quant, a few rows at a time) gives
    onnxruntime's quant_tensor_k_quant_cpu codes, scales and zero points exactly, whatever the
    chunk (row counts that do not divide the weight's included)."""
    import numpy as np
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    from edgekit.formats.onnx_int4.templatequant import chunked_k_quant

    w = _weight_with_odd_blocks()
    q, s, z = quant_tensor_k_quant_cpu(w.T, bits, 32)
    for chunk in (8, 8 * 37, 1 << 20):
        q2, s2, z2 = chunked_k_quant(w.T, bits, 32, chunk_blocks=chunk)
        assert q2.dtype == np.uint8 and np.array_equal(q.astype(np.uint8), q2)
        assert (s2.dtype, s2.shape, z2.dtype, z2.shape) == (s.dtype, s.shape, z.dtype, z.shape)
        assert s2.tobytes() == s.tobytes() and z2.tobytes() == z.tobytes()


def test_the_templates_k_quant_holds_a_chunk_not_the_weights_copies(monkeypatch):
    """Issue 12: the builder's k_quant search of a tied 128k-row lm_head held ~6 float32 copies
    of it (11.1 GiB stream child on a Llama-3.2-1B shape). Within chunked_builder_k_quant() the
    function rtn_quantize calls holds its results (a byte per weight, 9 per block) and one
    chunk's search, where the whole-weight search needs several float32 copies of the weight
    (checked too, so the bound means something)."""
    import tracemalloc

    from onnxruntime.quantization.neural_compressor import weight_only

    from edgekit.formats.onnx_int4 import templatequant
    from edgekit.formats.onnx_int4.templatequant import chunked_builder_k_quant

    monkeypatch.setattr(templatequant, "CHUNK_BLOCKS", 1024)  # 128 KiB of float32 per temporary

    w = _weight_with_odd_blocks(k=512, n=16384)  # 32 MiB of float32, 262144 blocks: 32 chunks
    original = weight_only.quant_tensor_k_quant_cuda

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn(w.T, 8, 32)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    with chunked_builder_k_quant():
        patched = weight_only.quant_tensor_k_quant_cuda
        assert patched is not original
        chunked = peak(patched)
    assert weight_only.quant_tensor_k_quant_cuda is original
    results = w.size + w.size // 32 * 9
    assert chunked < results + (4 << 20)  # + the chunk's search: ~20 temporaries of 128 KiB
    assert peak(weight_only.quant_tensor_k_quant_cpu) > 3 * w.nbytes


@pytest.mark.slow
def test_a_tied_models_template_searched_in_chunks_is_the_builder_paths_byte_for_byte(deep, tmp_path, monkeypatch):
    """The tied lm_head keeps the template's k_quant codes (the embedding shares them). With
    the template's search cut into chunks of a few rows (templatequant), the bundle is still
    the whole-model builder path's, byte for byte: the chunking is real here (16 blocks, where
    the tiny lm_head has hundreds), which the default chunk on a tiny model is not."""
    from edgekit.formats.onnx_int4 import stream, templatequant
    from edgekit.formats.onnx_int4.recipe import ALGORITHMS, builder_extra_options
    from edgekit.formats.onnx_int4.rewrite import requant_job

    ckpt = resolve(str(deep("qwen2")))  # tied embeddings
    assert json.loads((ckpt.path / "config.json").read_text())["tie_word_embeddings"]
    r = recipe(weight_search="edgekit")  # the default algorithm (k_quant_last), no imatrix pass
    calls = []
    chunked = templatequant.chunked_k_quant

    def counted(data, *a, **kw):
        calls.append(data.shape)
        return chunked(data, *a, **kw)

    monkeypatch.setattr(templatequant, "CHUNK_BLOCKS", 16)
    monkeypatch.setattr(templatequant, "chunked_k_quant", counted)
    out = tmp_path / "streamed"
    out.mkdir()
    job = {
        "input": str(ckpt.path),
        "output": str(out),
        "cache_dir": str(tmp_path / "cache"),
        "extra_options": builder_extra_options(r, False),
        "precision": "int4",
        "requant": requant_job(ckpt, r),
        "template": str(tmp_path / "template"),
        "mixed_layers": "mixed_layers" in ALGORITHMS[r.algorithm][1],
    }
    report = stream.child_stream(job, lambda job: pytest.fail("took the whole-model path"))
    assert report["path_taken"] == STREAMED
    assert any("tied embedding" in k for k in report["kept"])
    assert calls, "the template's k_quant did not go through chunked_k_quant"
    whole, _ = export(ckpt.path, tmp_path / "whole", whole_model=True, weight_search="edgekit")
    model_files = {k: v for k, v in digests(out).items() if k.startswith("model.onnx")}
    assert model_files == {k: v for k, v in digests(whole).items() if k.startswith("model.onnx")}
