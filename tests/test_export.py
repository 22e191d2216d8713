"""End to end: real exports of the tiny Phi-3 fixture and of SmolLM2-135M, opened in the
plain runtimes without edgekit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit import api
from edgekit.bundle import validate
from edgekit.cli import cli
from edgekit.errors import BadInput, UnsupportedArchitecture

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And one more, in digits: 1234?"},
]


def _reference_chat_ids(bundle: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundle)
    return list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True))


def _raw_llama(bundle: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(bundle / "model.gguf"), n_ctx=512, verbose=False)


def _raw_genai_greedy(bundle: Path, prompt: str, n: int) -> str:
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(tok.encode(prompt)) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(tok.encode(prompt))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return tok.decode(out)


# --- tiny Phi-3: the phi3 code path in seconds ---------------------------------------------


@pytest.mark.slow
def test_tiny_gguf_bundle(tiny_gguf):
    manifest = validate(tiny_gguf)
    assert manifest["format"] == "gguf-q4_k_m"
    assert manifest["source"]["architecture"] == "Phi3ForCausalLM"
    assert manifest["export"]["peak_rss_mb"] > 0 and manifest["export"]["wall_s"] > 0
    assert {"edgekit", "llama-cpp-python"} <= set(manifest["tools"])
    assert "README.md" in {f["path"] for f in manifest["files"]}
    llm = _raw_llama(tiny_gguf)
    assert llm.metadata.get("tokenizer.chat_template")
    out = llm("hello", max_tokens=4, temperature=0.0)
    assert out["choices"][0]["text"] is not None


@pytest.mark.slow
def test_tiny_onnx_bundle(tiny_onnx):
    manifest = validate(tiny_onnx)
    assert manifest["format"] == "onnx-int4"
    assert {"model.onnx", "genai_config.json"} <= {f["path"] for f in manifest["files"]}
    assert isinstance(_raw_genai_greedy(tiny_onnx, "hello world", 4), str)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_gguf", "tiny_onnx"])
def test_tiny_chat_prompt_ids_match_transformers(fixture, request):
    bundle = request.getfixturevalue(fixture)
    session, _ = api.open_bundle(bundle)
    try:
        assert session.chat_prompt_ids(CHAT) == _reference_chat_ids(bundle)
    finally:
        session.close()


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_gguf", "tiny_onnx"])
def test_run_through_cli_json(fixture, request):
    bundle = request.getfixturevalue(fixture)
    result = CliRunner().invoke(cli, ["run", str(bundle), "--prompt", "hi", "--max-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert 1 <= doc["generated_tokens"] <= 5 and doc["prompt_tokens"] > 1


@pytest.mark.slow
def test_export_cli_json_and_refusal_to_overwrite(tiny_phi3, tmp_path):
    out = tmp_path / "b"
    args = ["export", str(tiny_phi3), "--target", "gguf-q4_k_m", "--out", str(out), "--json", "-q", "--no-verify"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bundles"][0]["bundle"] == str(out) and doc["bundles"][0]["size_bytes"] > 0
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "--force" in again.stderr
    forced = CliRunner().invoke(cli, args + ["--force"])
    assert forced.exit_code == 0
    validate(out)


def test_failed_export_leaves_no_directory(tiny_phi3, tmp_path, monkeypatch):
    from edgekit.formats import backend

    mod = backend("gguf-q4_k_m")

    def boom(checkpoint, staging, recipe, progress):
        (staging / "model.gguf").write_bytes(b"half")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(mod, "export", boom)
    with pytest.raises(RuntimeError):
        api.export(str(tiny_phi3), "gguf-q4_k_m", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_names_supported_ones(tiny_phi3, tmp_path):
    ck = tmp_path / "weird"
    shutil.copytree(tiny_phi3, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture) as e:
        api.export(str(ck), "gguf-q4_k_m", tmp_path / "out")
    assert "Phi3ForCausalLM" in str(e.value) and e.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_recipe_override_is_typed(tiny_phi3, tmp_path):
    with pytest.raises(BadInput, match="unknown key 'colour'"):
        api.export(str(tiny_phi3), "onnx-int4", tmp_path / "o", recipe={"colour": "red"})


# --- SmolLM2-135M: real weights ------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_says_paris_in_raw_llama_cpp(smol_gguf):
    validate(smol_gguf)
    llm = _raw_llama(smol_gguf)
    out = llm("The capital of France is", max_tokens=12, temperature=0.0, top_k=1)
    assert "Paris" in out["choices"][0]["text"]


@pytest.mark.slow
def test_smollm2_onnx_says_paris_in_raw_genai(smol_onnx):
    validate(smol_onnx)
    assert "Paris" in _raw_genai_greedy(smol_onnx, "The capital of France is", 12)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smol_gguf", "smol_onnx"])
def test_smollm2_chat_prompt_ids_match_transformers(fixture, request):
    bundle = request.getfixturevalue(fixture)
    session, _ = api.open_bundle(bundle)
    try:
        assert session.chat_prompt_ids(CHAT) == _reference_chat_ids(bundle)
    finally:
        session.close()
