"""Checkpoint resolution rejects bad input with one actionable line (exit code 2)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from edgekit.checkpoint import check_safetensors, content_hash, resolve
from edgekit.errors import BadInput, OfflineError


def _write_safetensors(path: Path, n_floats: int = 4, lie: int = 0) -> None:
    header = {"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, n_floats * 4 + lie]}}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (n_floats * 4))


def _ckpt(tmp_path: Path, **config) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, **config}))
    _write_safetensors(d / "model.safetensors")
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []}))
    return d


def test_valid_local_checkpoint(tmp_path):
    ck = resolve(str(_ckpt(tmp_path)))
    assert ck.kind == "local" and ck.architecture == "LlamaForCausalLM"
    assert ck.weight_files == ("model.safetensors",)
    assert len(ck.provenance()["content_sha256"]) == 64


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "is not valid JSON"),
        (lambda d: (d / "config.json").write_text("{}"), "names no architecture"),
        (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
        (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-3]), "truncated"),
        (lambda d: _write_safetensors(d / "model.safetensors", lie=64), "truncated"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 16), "not a valid safetensors"),
        (
            lambda d: (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "z": 99}}})),
            "vocab_size is 10",
        ),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({"architectures": ["X"], "auto_map": {"AutoModel": "m.X"}})
            ),
            "--trust-remote-code",
        ),
    ],
)
def test_bad_checkpoints_are_refused_with_a_fix(tmp_path, mutate, expect):
    d = _ckpt(tmp_path)
    mutate(d)
    with pytest.raises(BadInput) as e:
        resolve(str(d))
    assert expect in e.value.one_line()
    assert e.value.exit_code == 2
    assert "\n" not in e.value.one_line()


def test_pickle_weights_need_explicit_permission(tmp_path):
    d = _ckpt(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(BadInput, match="--allow-pickle"):
        resolve(str(d))
    assert resolve(str(d), allow_pickle=True).pickle_weights


def test_safetensors_preferred_over_pickle(tmp_path):
    d = _ckpt(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"ignored")
    assert resolve(str(d)).weight_files == ("model.safetensors",)


def test_missing_path_and_file_instead_of_dir(tmp_path):
    with pytest.raises(BadInput, match="no such directory"):
        resolve(str(tmp_path / "nope"))
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(BadInput, match="is a file"):
        resolve(str(f))


def test_unknown_alias_and_uncached_hub_id_offline():
    with pytest.raises(BadInput, match="known alias"):
        resolve("no-such-alias")
    with pytest.raises(OfflineError, match="local checkpoint directory"):
        resolve("some-org/some-model-not-cached", offline=True)
    with pytest.raises(OfflineError, match="not in the local Hugging Face cache"):
        resolve("phi3-mini", offline=True)


def test_content_hash_changes_with_weights(tmp_path):
    d = _ckpt(tmp_path)
    h1 = content_hash(d)
    _write_safetensors(d / "model.safetensors", n_floats=5)
    assert content_hash(d) != h1


def test_check_safetensors_accepts_valid(tmp_path):
    p = tmp_path / "m.safetensors"
    _write_safetensors(p)
    check_safetensors(p)


def test_hub_id_resolves_from_the_local_hf_cache(tmp_path, monkeypatch, tiny_phi3):
    """A hub id already in the Hugging Face cache works offline, through huggingface_hub."""
    import shutil

    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--edgekit-test--tiny-phi3" / "snapshots" / commit
    shutil.copytree(tiny_phi3, snap)
    (cache / "models--edgekit-test--tiny-phi3" / "refs").mkdir()
    (cache / "models--edgekit-test--tiny-phi3" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    ck = resolve("edgekit-test/tiny-phi3", offline=True)
    assert ck.kind == "hub" and ck.hub_id == "edgekit-test/tiny-phi3"
    assert ck.path == snap.resolve() and ck.architecture == "Phi3ForCausalLM"


@pytest.mark.parametrize("model_type, warned", [("phi3", False), ("mistral", True)])
def test_no_false_mistral_regex_warning(tmp_path, monkeypatch, model_type, warned):
    """transformers 4.57.6 warns of Mistral's "incorrect regex pattern" (and "incorrect
    tokenization") for any local fast tokenizer of more than 100000 tokens (Gemma 3, Llama 3,
    Phi-4-mini, Qwen2.5) beside a config.json its own version saved; edgekit answers it for the
    model types it is not about and leaves it for Mistral's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, tokenization_utils_base

    from edgekit.hftokenizer import load_tokenizer

    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3} | {f"w{i}": i for i in range(4, 100_010)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "transformers_version": "4.57.6"}))
    # transformers' own logger, whatever stream and level earlier tests left it with
    warnings: list[str] = []
    monkeypatch.setattr(tokenization_utils_base.logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    tok = load_tokenizer(tmp_path)
    assert tok("ab a").input_ids == [3, 1]  # a working tokenizer either way
    assert any("incorrect regex pattern" in w for w in warnings) is warned
