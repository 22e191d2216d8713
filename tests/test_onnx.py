"""onnx-int4 backend: recipe, export (genai builder and optimum fallback), session.

Bundles are checked with plain onnxruntime-genai where it matters, so a test passes only if
a user without edgekit could run the bundle.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edgekit.checkpoint import resolve
from edgekit.errors import BadInput, ToolFailed, UnsupportedArchitecture
from edgekit.formats import onnx_int4
from edgekit.formats.onnx_int4.architectures import BUILDER_EXCLUDED
from edgekit.formats.onnx_int4.export import builder_lm_head_lookalikes, choose_engine
from edgekit.formats.onnx_int4.files import set_context_length
from edgekit.formats.onnx_int4.recipe import OnnxRecipe, builder_extra_options
from edgekit.targets import load_targets

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Write def add(a, b): return a + b"},
    ],
]
TEXTS = [
    "The capital of France is",
    "  two leading spaces",
    "line one\nline two\n\ttab",
    "digits 2024 and 3.14159",
    "Bonjour, où est la gare?",
    "<|user|>\nhi<|end|>\n<|assistant|>\n",
]


# --- helpers -------------------------------------------------------------------------------


class RecordingProgress:
    def __init__(self):
        self.steps: list[str] = []

    @contextmanager
    def step(self, name, total=None):
        self.steps.append(name)

        class Step:
            def advance(self, n=1):
                pass

            def update(self, completed, total=None):
                pass

        yield Step()

    def note(self, text):
        pass


def recipe(**overrides) -> OnnxRecipe:
    spec = load_targets().format("onnx-int4")
    return onnx_int4.parse_recipe({**spec.recipe, **overrides}, "test")


def export(checkpoint_dir: Path, out: Path, progress=None, **overrides):
    out.mkdir(parents=True)
    notes = onnx_int4.export(resolve(str(checkpoint_dir)), out, recipe(**overrides), progress or RecordingProgress())
    return out, notes


def raw_genai_greedy(bundle: Path, prompt_ids: list[int], n: int) -> list[int]:
    """What a plain onnxruntime-genai user gets; no edgekit code involved."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n, min_length=len(prompt_ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def raw_genai_logits(bundle: Path, prompt_ids: list[int]) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    return np.asarray(generator.get_logits()).reshape(-1)


def hf_tokenizer(checkpoint_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_dir))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fixtures: one export per path, shared by the tests below ------------------------------


@pytest.fixture(scope="module")
def tiny_longrope(tmp_path_factory) -> Path:
    from edgekit.tiny import make_tiny

    return make_tiny("phi3-longrope", tmp_path_factory.mktemp("ckpt") / "tiny-phi3-longrope")


@pytest.fixture(scope="module")
def built(tiny_phi3, tmp_path_factory):
    return export(tiny_phi3, tmp_path_factory.mktemp("onnx") / "builder")


@pytest.fixture(scope="module")
def fallback(tiny_phi3, tmp_path_factory):
    return export(tiny_phi3, tmp_path_factory.mktemp("onnx") / "optimum", engine="optimum")


@pytest.fixture()
def session(built):
    s = onnx_int4.open_session(built[0], {}, threads=1)
    yield s
    s.close()


# --- recipe --------------------------------------------------------------------------------


def test_recipe_from_targets_toml():
    r = recipe()
    assert (r.engine, r.block_size, r.accuracy_level, r.algorithm) == ("auto", 32, 4, "k_quant_last")
    assert r.is_symmetric and not r.float_lm_head and r.embeddings == "auto"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("block_size", 48, "block_size = 48"),
        ("block_size", True, "block_size = True"),
        ("accuracy_level", 5, "accuracy_level"),
        ("algorithm", "gptq", "algorithm = 'gptq'"),
        ("engine", "olive", "engine"),
        ("is_symmetric", "yes", "is_symmetric"),
        ("exclude_lm_head", True, "unknown key 'exclude_lm_head'"),
        ("embeddings", "int2", "embeddings = 'int2'"),
    ],
)
def test_recipe_rejects(key, value, message):
    with pytest.raises(BadInput, match=message):
        recipe(**{key: value})


def test_extra_options_mapping():
    r = recipe(
        block_size=64,
        accuracy_level=0,
        algorithm="rtn_last",
        is_symmetric=False,
        float_lm_head=True,
        embeddings="float",
    )
    assert builder_extra_options(r, trust_remote_code=False) == {
        "block_size": "64",
        "accuracy_level": "0",
        "algo_config": "rtn_last",
        "is_symmetric": "false",
        "hf_token": "false",
        "hf_remote": "false",
        "nodes_to_exclude": "/lm_head/MatMul,/model/embed_tokens/Gather",
    }
    # a quantized embedding is edgekit's to write (embedquant.py), with any algorithm: the builder
    # keeps it float
    opts = builder_extra_options(recipe(embeddings="int4"), trust_remote_code=True)
    assert "op_types_to_quantize" not in opts and "nodes_to_exclude" not in opts and opts["hf_remote"] == "true"


class FakeCheckpoint:
    def __init__(self, architecture, config=None):
        self.architecture = architecture
        self.config = config or {}


@pytest.mark.parametrize(
    "arch, engine, expected",
    [
        ("Phi3ForCausalLM", "auto", "builder"),
        ("Phi3ForCausalLM", "optimum", "optimum"),
        ("GPTNeoXForCausalLM", "auto", "optimum"),  # builder has no GPT-NeoX
        ("PhiMoEForCausalLM", "auto", UnsupportedArchitecture),  # builder forces CUDA
        ("GPTNeoXForCausalLM", "builder", UnsupportedArchitecture),
        ("BloomForCausalLM", "auto", UnsupportedArchitecture),
    ],
)
def test_engine_choice(arch, engine, expected):
    if isinstance(expected, str):
        assert choose_engine(FakeCheckpoint(arch), recipe(engine=engine)) == expected
    else:
        with pytest.raises(expected):
            choose_engine(FakeCheckpoint(arch), recipe(engine=engine))


def test_a_width_equal_to_the_vocabulary_routes_to_optimum():
    # The builder takes any Linear with vocab_size outputs for the lm_head (has_lm_head).
    clash = {
        "vocab_size": 512,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 384,
    }  # qkv_proj: (4 + 2 x 2) x 64 = 512
    assert builder_lm_head_lookalikes(clash) == ["qkv_proj"]
    assert choose_engine(FakeCheckpoint("Phi3ForCausalLM", clash), recipe()) == "optimum"
    assert choose_engine(FakeCheckpoint("Phi3ForCausalLM", {**clash, "vocab_size": 32064}), recipe()) == "builder"
    # A forced engine is the user's call.
    assert choose_engine(FakeCheckpoint("Phi3ForCausalLM", clash), recipe(engine="builder")) == "builder"


def test_longrope_context_cap(tmp_path):
    genai = tmp_path / "genai_config.json"
    longrope = {
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
    }

    def write():
        genai.write_text(json.dumps({"model": {"context_length": 131072}, "search": {"max_length": 131072}}))

    write()
    assert set_context_length(longrope, genai, 0)[0] == 4096
    cfg = json.loads(genai.read_text())
    assert cfg["model"]["context_length"] == cfg["search"]["max_length"] == 4096
    write()
    context, note = set_context_length(longrope, genai, 131072)
    assert context == 131072 and "past LongRoPE's switch" in note
    write()
    assert set_context_length({"max_position_embeddings": 131072}, genai, 0) == (131072, None)
    with pytest.raises(BadInput, match="context_length"):
        recipe(context_length=-1)


def test_catalog_families_are_in_the_table():
    for arch in (
        "Phi3ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3SmallForCausalLM",
    ):
        assert arch in onnx_int4.SUPPORTED_ARCHITECTURES
    assert "PhiMoEForCausalLM" in BUILDER_EXCLUDED


# --- export: genai builder -----------------------------------------------------------------


@pytest.mark.slow
def test_builder_bundle_files(built):
    bundle, notes = built
    for name in (
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (bundle / name).is_file(), name
    template = json.loads((bundle / "tokenizer_config.json").read_text())["chat_template"]
    assert template == (bundle / "chat_template.jinja").read_text()
    assert notes.path_taken == "genai-builder"
    assert notes.quantization["builder_extra_options"]["algo_config"] == "k_quant_last"
    weights = notes.quantization["weights"]
    assert weights["matmul_int4"] > 0 and weights["matmul_int8"] > 0 and weights["matmul_float"] == []
    assert {"onnxruntime", "onnxruntime-genai", "onnx", "transformers"} <= set(notes.tools)


@pytest.mark.slow
def test_builder_bundle_runs_in_plain_genai(built, tiny_phi3):
    ids = hf_tokenizer(tiny_phi3).encode("The capital of France is", add_special_tokens=False)
    out = raw_genai_greedy(built[0], ids, 8)
    assert len(out) == 8 and all(0 <= t < 512 for t in out)


@pytest.mark.slow
def test_rebuild_is_byte_identical_and_quiet(built, tiny_phi3, tmp_path, capfd):
    progress = RecordingProgress()
    again, notes = export(tiny_phi3, tmp_path / "again", progress)
    captured = capfd.readouterr()
    assert captured.out == ""  # --json owns stdout
    assert "Reading layer" not in captured.err  # the builder's chatter stays in its log
    assert {"loading checkpoint", "converting layers", "quantizing to int4", "writing model.onnx"} <= set(
        progress.steps
    )
    assert "model.onnx" in notes.reproducible_files and "model.onnx.data" in notes.reproducible_files
    for name in notes.reproducible_files:
        assert sha(again / name) == sha(built[0] / name), name


@pytest.mark.slow
def test_longrope_exports_and_loads(tiny_longrope, tmp_path):
    import onnx

    bundle, notes = export(tiny_longrope, tmp_path / "lr")
    ops = {n.op_type for n in onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.node}
    assert "If" in ops  # Phi3MiniLongRoPEModel switches short/long factor caches by length
    ids = hf_tokenizer(tiny_longrope).encode("The capital of France is", add_special_tokens=False)
    assert len(raw_genai_greedy(bundle, ids, 6)) == 6


@pytest.mark.slow
def test_builder_failure_is_tool_failed_with_its_last_words(tiny_phi3, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_phi3, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96  # weights say 128
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ToolFailed) as e:
        export(broken, tmp_path / "out")
    assert "size mismatch" in str(e.value) and "Full log:" in str(e.value)


# --- export: optimum fallback ----------------------------------------------------------------


@pytest.mark.slow
def test_fallback_bundle_runs_in_plain_genai(fallback, built, tiny_phi3):
    bundle, notes = fallback
    assert notes.path_taken == "optimum+MatMulNBits"
    assert any("fallback" in n for n in notes.notes)
    assert "optimum" in notes.tools
    ids = hf_tokenizer(tiny_phi3).encode("The capital of France is", add_special_tokens=False)
    assert len(raw_genai_greedy(bundle, ids, 8)) == 8
    # Same weights, same int4 recipe, another graph: the logits agree with the builder's,
    # which shows edgekit's genai_config.json wires the optimum graph correctly.
    np.testing.assert_allclose(raw_genai_logits(bundle, ids), raw_genai_logits(built[0], ids), atol=1e-3)


@pytest.mark.slow
def test_fallback_keeps_recipe_meaning(fallback, built):
    a, b = fallback[1].quantization["weights"], built[1].quantization["weights"]
    assert a["matmul_int8"] == b["matmul_int8"]  # lm_head + the same mixed layers in int8
    assert a["matmul_float"] == [] and a["embedding"] == "float"


@pytest.mark.slow
def test_auto_falls_back_for_an_architecture_the_builder_lacks(tiny_phi3, tmp_path):
    import shutil

    import onnxruntime as ort
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    ck = tmp_path / "neox"
    ck.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        shutil.copy(tiny_phi3 / name, ck / name)
    config = GPTNeoXConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(ck)

    bundle, notes = export(ck, tmp_path / "out")
    assert notes.path_taken == "optimum+MatMulNBits"
    assert notes.quantization["weights"]["matmul_int8"] == 1  # embed_out, found as the logits MatMul
    ids = [5, 100, 200, 300, 17, 44]
    assert len(raw_genai_greedy(bundle, ids, 6)) == 6
    # onnxruntime-genai feeds the graph exactly what a hand-driven onnxruntime session does.
    session = ort.InferenceSession(str(bundle / "model.onnx"))
    feeds = {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, len(ids)), np.int64),
        "position_ids": np.arange(len(ids), dtype=np.int64)[None],
    }
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    expected = session.run(["logits"], feeds)[0][0, -1]
    np.testing.assert_allclose(raw_genai_logits(bundle, ids), expected, atol=1e-4)


# --- session ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_encode_matches_transformers(session, tiny_phi3):
    hf = hf_tokenizer(tiny_phi3)
    for text in TEXTS:
        assert session.encode(text) == hf.encode(text, add_special_tokens=False), text


@pytest.mark.slow
@pytest.mark.parametrize("chat", CHATS)
def test_chat_prompt_ids_match_transformers(session, tiny_phi3, chat):
    expected = hf_tokenizer(tiny_phi3).apply_chat_template(chat, add_generation_prompt=True)
    assert session.chat_prompt_ids(chat) == list(expected)


@pytest.mark.slow
def test_generate_streams_and_matches_plain_genai(session, built):
    ids = session.chat_prompt_ids(CHATS[0])
    pieces: list[str] = []
    gen = session.generate(ids, 10, on_text=pieces.append, ignore_eos=True)
    assert gen.stopped_by == "max_tokens" and len(gen.token_ids) == 10
    assert gen.prompt_tokens == len(ids) and gen.text == "".join(pieces)
    assert list(gen.token_ids) == raw_genai_greedy(built[0], ids, 10)


@pytest.fixture(scope="module")
def eos_bundle(tiny_phi3, tmp_path_factory):
    """A checkpoint whose every next token is EOS: embeddings all point one way, and only the
    EOS row of a float lm_head reads that direction."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    src = tmp_path_factory.mktemp("ckpt") / "eos"
    shutil.copytree(tiny_phi3, src)
    model = AutoModelForCausalLM.from_pretrained(str(src))
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0] = 1.0
    model.save_pretrained(str(src))
    bundle, _ = export(src, tmp_path_factory.mktemp("onnx") / "eos", float_lm_head=True)
    return bundle, eos


@pytest.mark.slow
def test_generate_stops_at_eos_unless_ignored(eos_bundle):
    bundle, eos = eos_bundle
    s = onnx_int4.open_session(bundle, {})
    try:
        ids = s.encode("hello")
        stopped = s.generate(ids, 5)
        assert stopped.stopped_by == "eos" and stopped.token_ids == ()
        forced = s.generate(ids, 5, ignore_eos=True)
        assert forced.stopped_by == "max_tokens" and len(forced.token_ids) == 5 and eos not in forced.token_ids
    finally:
        s.close()


@pytest.mark.slow
def test_generate_rejects_more_than_the_context(session):
    with pytest.raises(BadInput, match="context length"):
        session.generate([1, 2, 3], session.context_length)


# --- SmolLM2-135M: real weights ------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_builder_bundle(smollm2_dir, tmp_path):
    bundle, notes = export(smollm2_dir, tmp_path / "smol")
    s = onnx_int4.open_session(bundle, {})
    try:
        hf = hf_tokenizer(smollm2_dir)
        for chat in CHATS:
            assert s.chat_prompt_ids(chat) == list(hf.apply_chat_template(chat, add_generation_prompt=True))
        gen = s.generate(s.encode("The capital of France is"), 12)
        assert "Paris" in gen.text
    finally:
        s.close()
