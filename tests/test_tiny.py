"""Tiny random checkpoints: they load in transformers, generate, and carry a usable tokenizer."""

from __future__ import annotations

import hashlib
import json

import pytest

from edgekit.errors import BadInput, UnsupportedArchitecture
from edgekit.tiny import FAMILIES, HEAD_DIM, make_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

PHI3_SPECIALS = ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<|endoftext|>"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def phi3(tiny_root):
    return make_tiny("phi3", tiny_root / "phi3")


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def file_hashes(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_phi3_is_a_complete_checkpoint(phi3):
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ):
        assert (phi3 / name).is_file(), name
    config = json.loads((phi3 / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    # The chat template lives in tokenizer_config.json, where llama.cpp and genai look for it.
    assert "<|assistant|>" in json.loads((phi3 / "tokenizer_config.json").read_text())["chat_template"]


def test_phi3_has_fused_projections(phi3):
    from safetensors import safe_open

    with safe_open(phi3 / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names


def test_phi3_loads_and_generates(phi3):
    tok, model = load(phi3)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_phi3_embedding_covers_tokenizer(phi3):
    tok, model = load(phi3)
    # Padded past the tokenizer, as in the real Phi-3 (32011 tokens, 32064 rows).
    assert len(tok) <= model.config.vocab_size == model.get_input_embeddings().weight.shape[0]


def test_phi3_special_tokens_are_single_ids(phi3):
    tok, _ = load(phi3)
    for special in PHI3_SPECIALS:
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1, special
        assert tok.decode(ids) == special


def test_phi3_tokenizer_round_trips(phi3):
    tok, _ = load(phi3)
    plain = "Hello world, 2+2 = 4. Où est la gare?"
    assert tok.decode(tok.encode(plain)) == plain
    # Like the real Phi-3 (a legacy SentencePiece tokenizer): chat tokens swallow the newline
    # after them, and the text after a special token gets a leading "▁". llama.cpp and
    # onnxruntime-genai tokenize the same way, so token ids agree across runtimes.
    chat = "<|user|>\nHello world<|end|>\n<|assistant|>\n"
    ids = tok.encode(chat)
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "<|user|>" and pieces[-2:] == ["<|end|>", "<|assistant|>"]
    assert tok.decode(ids) == "<|user|> Hello world<|end|><|assistant|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"


def test_phi3_chat_template(phi3):
    tok, _ = load(phi3)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == tok.convert_tokens_to_ids("<|system|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_phi3_generation_stops_on_end_of_turn(phi3):
    gen = json.loads((phi3 / "generation_config.json").read_text())
    tok, _ = load(phi3)
    assert {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|end|>")} <= set(gen["eos_token_id"])


def test_same_seed_same_bytes(phi3, tiny_root):
    again = make_tiny("phi3", tiny_root / "phi3-again")
    assert file_hashes(again) == file_hashes(phi3)
    other = make_tiny("phi3", tiny_root / "phi3-seed1", seed=1)
    assert file_hashes(other)["model.safetensors"] != file_hashes(phi3)["model.safetensors"]


def test_longrope_variant(tiny_root):
    path = make_tiny("phi3-longrope", tiny_root / "phi3-longrope")
    config = json.loads((path / "config.json").read_text())
    scaling = config["rope_scaling"]
    assert scaling["type"] == "longrope"
    assert len(scaling["short_factor"]) == len(scaling["long_factor"]) == HEAD_DIM // 2
    assert config["original_max_position_embeddings"] == 4096
    assert config["max_position_embeddings"] == 131072
    _, model = load(path)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)


def _family_params():
    params = []
    for name, fam in FAMILIES.items():
        marks = []
        if fam.unbuildable:
            marks.append(pytest.mark.skip(reason=fam.unbuildable))
        if fam.needs_embedded:  # builds the SmolLM2 checkpoint once (~1 minute) for its tokenizer
            marks.append(pytest.mark.slow)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("name", _family_params())
def test_family_builds_and_runs(name, tiny_root):
    fam = FAMILIES[name]
    path = make_tiny(name, tiny_root / f"family-{name}")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [fam.architecture]
    tok, model = load(path)
    assert len(tok) <= model.config.vocab_size
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_unbuildable_family_says_why(tmp_path):
    blocked = [f for f in FAMILIES.values() if f.unbuildable]
    assert blocked, "phi3small is expected to be unbuildable under transformers 4.57"
    with pytest.raises(UnsupportedArchitecture, match="trust_remote_code"):
        make_tiny(blocked[0].name, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_family(tmp_path):
    with pytest.raises(BadInput, match="phi3"):
        make_tiny("nope", tmp_path / "x")


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput):
        make_tiny("llama", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_replaces_its_own_output_and_leaves_no_temp(tmp_path):
    make_tiny("llama", tmp_path / "m")
    make_tiny("llama", tmp_path / "m", seed=3)
    assert json.loads((tmp_path / "m" / "edgekit-tiny.json").read_text())["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
