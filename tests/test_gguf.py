"""gguf-q4_k_m backend: the converter fetch, the export, and the llama.cpp session.

Exports tiny random Phi-3 checkpoints (seconds each) and checks the result with plain
llama-cpp-python and transformers, without edgekit in between where it matters.
"""

from __future__ import annotations

import ast
import io
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgekit.errors import BadInput, IntegrityError
from edgekit.formats import gguf_q4km as gguf_fmt
from edgekit.formats.gguf_q4km.export import gguf_model_name
from edgekit.formats.gguf_q4km.recipe import MODEL_FILE, PATH_TAKEN, GgufRecipe
from edgekit.progress import NullProgress

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "And one more, in digits: 1234? café"},
    ],
]
TEXTS = [
    "Hello world!",
    " leading space",
    "The capital of France is Paris.",
    "café naïve émigré",
    "a\n\nb  c\td",
    "12345 def f(x):\n    return x * 2",
]
K_TYPES = {"q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K"}
FALLBACK_TYPES = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16"}


# --- fixtures ----------------------------------------------------------------------------------


def _export(ckpt_dir: Path, out: Path):
    from edgekit.checkpoint import resolve

    out.mkdir(parents=True)
    recipe = gguf_fmt.parse_recipe({}, "test")
    return gguf_fmt.export(resolve(str(ckpt_dir)), out, recipe, NullProgress())


@pytest.fixture(scope="module")
def tiny_export(tiny_phi3, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny"
    return out, _export(tiny_phi3, out)


@pytest.fixture(scope="module")
def wide_phi3(tiny_phi3, tmp_path_factory) -> Path:
    """The tiny Phi-3 re-initialised 256 wide: the smallest width where every matrix row fits
    K-quant blocks (256 values), so Q4_K_M's real mix shows instead of fallbacks."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    out = tmp_path_factory.mktemp("ckpt") / "wide-phi3"
    shutil.copytree(tiny_phi3, out)
    (out / "model.safetensors").unlink()
    config = Phi3Config.from_pretrained(out)
    config.hidden_size, config.intermediate_size = 256, 512
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def wide_export(wide_phi3, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "wide"
    return out, _export(wide_phi3, out)


@pytest.fixture(scope="module")
def session(tiny_export):
    bundle, _ = tiny_export
    s = gguf_fmt.open_session(bundle, {}, threads=2)
    yield s
    s.close()


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_export):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_export[0])  # the copied files alone must suffice


# --- converter fetch -------------------------------------------------------------------------


def test_supported_architectures_are_registered_in_the_converter():
    from edgekit.llamacpp_tools import converter_dir

    source = (converter_dir() / "conversion" / "__init__.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    registry = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "TEXT_MODEL_MAP"
    )
    assert set(registry) >= gguf_fmt.SUPPORTED_ARCHITECTURES


def _sdist(path: Path, version: str, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    top = f"llama_cpp_python-{version}"
    with tarfile.open(path, "w:gz") as tar:
        files = {"PKG-INFO": f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {version}\n".encode(), **members}
        for name, data in files.items():
            info = tarfile.TarInfo(name if name.startswith(("/", "..")) else f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


GOOD = {
    "vendor/llama.cpp/convert_hf_to_gguf.py": b"print('convert')\n",
    "vendor/llama.cpp/conversion/__init__.py": b"",
    "vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
    "vendor/llama.cpp/gguf-py/pyproject.toml": b'[project]\nname = "gguf"\nversion = "9.9.9"\n',
    "vendor/llama.cpp/ggml/src/big.c": b"not wanted",
}


def test_extracts_only_the_converter(tmp_path):
    from edgekit.llamacpp_tools import _extract_atomically

    sdist = _sdist(tmp_path / "s.tar.gz", "1.2.3", GOOD)
    root = tmp_path / "cache" / "1.2.3"
    root.parent.mkdir()
    _extract_atomically(sdist, root, "1.2.3", "test")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        "SOURCE.json",
        "conversion/__init__.py",
        "convert_hf_to_gguf.py",
        "gguf-py/gguf/__init__.py",
        "gguf-py/pyproject.toml",
    ]
    assert json.loads((root / "SOURCE.json").read_text())["gguf_py"] == "9.9.9"
    assert list(root.parent.iterdir()) == [root]  # no temp dir left behind


@pytest.mark.parametrize(
    "bad",
    [
        {"vendor/llama.cpp/conversion/../../../evil.py": b"x"},
        {"/vendor/llama.cpp/conversion/abs.py": b"x"},
    ],
)
def test_rejects_unsafe_members(tmp_path, bad):
    from edgekit.llamacpp_tools import _extract_atomically

    sdist = _sdist(tmp_path / "s.tar.gz", "1.2.3", {**GOOD, **bad})
    with pytest.raises((IntegrityError, BadInput)):
        _extract_atomically(sdist, tmp_path / "root", "1.2.3", "test")
    assert not (tmp_path / "root").exists() and not (tmp_path.parent / "evil.py").exists()


def test_rejects_links(tmp_path):
    from edgekit.llamacpp_tools import _extract_atomically

    sdist = _sdist(tmp_path / "s.tar.gz", "1.2.3", GOOD, links={"vendor/llama.cpp/conversion/x.py": "/etc/passwd"})
    with pytest.raises(IntegrityError):
        _extract_atomically(sdist, tmp_path / "root", "1.2.3", "test")
    assert not (tmp_path / "root").exists()


def test_rejects_an_sdist_of_another_version(tmp_path):
    from edgekit.llamacpp_tools import _extract_atomically

    sdist = _sdist(tmp_path / "s.tar.gz", "0.0.1", GOOD)
    with pytest.raises(BadInput, match="0.0.1.*1.2.3"):
        _extract_atomically(sdist, tmp_path / "root", "1.2.3", "test")


def test_env_sdist_must_exist(tmp_path, monkeypatch):
    from edgekit import llamacpp_tools

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(llamacpp_tools.SDIST_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(BadInput, match="does not exist"):
        llamacpp_tools.converter_dir()


# --- recipe --------------------------------------------------------------------------------


def test_recipe_from_targets_file():
    from edgekit.targets import load_targets

    spec = load_targets().format("gguf-q4_k_m")
    recipe = gguf_fmt.parse_recipe(spec.recipe, spec.source)
    assert recipe == GgufRecipe(intermediate="f16", quant_type="Q4_K_M", quant_threads=0, imatrix="calibration")
    assert recipe.ftype == 15


@pytest.mark.parametrize(
    "table, match",
    [
        ({"quant_type": "Q4_K_XL"}, "no quantization type"),
        ({"intermediate": "q8_0"}, "intermediate"),
        ({"quant_threads": -1}, "quant_threads"),
        ({"block_size": 32}, "unknown key"),
        ({"quant_threads": "4"}, "must be int"),
    ],
)
def test_bad_recipes(table, match):
    with pytest.raises(BadInput, match=match):
        gguf_fmt.parse_recipe(table, "gguf-q4_k_m.toml [recipe]")


# --- the llama.cpp name quirk ------------------------------------------------------------------


def _tokenizer_dir(tmp_path: Path, name: str, rstrip: bool) -> Path:
    d = tmp_path / name
    d.mkdir()
    added = [{"id": 0, "content": "<|user|>", "special": True, "rstrip": rstrip}]
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    return d


@pytest.mark.parametrize(
    "dirname, hub_id, rstrip, arch, expected",
    [
        ("tiny-phi3", None, False, "Phi3ForCausalLM", "tiny-phi 3"),
        ("x", "microsoft/Phi-3-mini-4k-instruct", True, "Phi3ForCausalLM", "Phi-3-mini-4k-instruct"),
        ("x", "microsoft/Phi-3-mini-4k-instruct", False, "Phi3ForCausalLM", "Phi 3-mini-4k-instruct"),
        ("my-model", None, True, "Phi3ForCausalLM", "my-model (phi3)"),
        ("my-llama", None, True, "LlamaForCausalLM", "my-llama"),
    ],
)
def test_gguf_model_name_tells_llama_cpp_what_the_tokenizer_does(tmp_path, dirname, hub_id, rstrip, arch, expected):
    ckpt = SimpleNamespace(path=_tokenizer_dir(tmp_path, dirname, rstrip), hub_id=hub_id, architecture=arch)
    assert gguf_model_name(ckpt) == expected


# --- export --------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_export_files_and_notes(tiny_export, tiny_phi3):
    bundle, notes = tiny_export
    names = {p.name for p in bundle.iterdir()}
    assert MODEL_FILE in names
    assert not any(n.startswith("model-") for n in names)  # the f16 intermediate is gone
    assert {"tokenizer_config.json", "generation_config.json"} <= names
    assert "config.json" not in names
    for name in names - {MODEL_FILE, "Modelfile"}:
        assert (bundle / name).read_bytes() == (tiny_phi3 / name).read_bytes()
    assert "FROM ./model.gguf" in (bundle / "Modelfile").read_text()
    assert notes.path_taken == PATH_TAKEN
    assert set(notes.reproducible_files) == names
    assert {"llama-cpp-python", "convert_hf_to_gguf", "gguf-py"} <= set(notes.tools)
    # 64-wide rows cannot hold a 256-value K block: every matrix falls back, and says so.
    assert notes.quantization["fallback_tensors"] > 0
    assert any("fell back" in n and "q4_K -> q5_0" in n for n in notes.notes)


@pytest.mark.slow
def test_tiny_gguf_opens_in_plain_llama_cpp(tiny_export, tiny_phi3, hf_tokenizer):
    import llama_cpp

    from edgekit.checkpoint import resolve

    bundle, _ = tiny_export
    llm = llama_cpp.Llama(model_path=str(bundle / "model.gguf"), n_ctx=256, verbose=False)
    try:
        assert llm.metadata["general.architecture"] == "phi3"
        # Our name, not the converter's guess: llama.cpp keys Phi-3 token stripping on it.
        assert llm.metadata["general.name"] == gguf_model_name(resolve(str(tiny_phi3)))
        assert llm.metadata["tokenizer.chat_template"] == hf_tokenizer.chat_template
        assert llm.metadata["tokenizer.ggml.model"] == "llama"
        assert llm.n_vocab() >= len(hf_tokenizer)  # the embedding may be padded past the tokenizer
        ids = llm.tokenize(b"The capital of France is", add_bos=False)
        assert ids == hf_tokenizer.encode("The capital of France is", add_special_tokens=False)
    finally:
        llm.close()


def _types(bundle: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (llama.cpp type name, shape), read by gguf-py independently of edgekit."""
    from gguf import GGUFReader

    reader = GGUFReader(str(bundle / "model.gguf"))
    return {t.name: (t.tensor_type.name.lower().replace("_k", "_K"), [int(x) for x in t.shape]) for t in reader.tensors}


def _check_types(bundle: Path) -> int:
    """Every matrix is a K-quant when its rows fit 256-value blocks, else a 32-block fallback;
    norms and other vectors stay f32. Returns the number of K-quant tensors."""
    k = 0
    for name, (kind, shape) in _types(bundle).items():
        if len(shape) == 1 or shape[1:] == [1] * (len(shape) - 1):
            assert kind == "f32", name
        elif shape[0] % 256 == 0:
            assert kind in K_TYPES, (name, kind, shape)
            k += 1
        else:
            assert kind in FALLBACK_TYPES, (name, kind, shape)
    return k


@pytest.mark.slow
def test_tiny_tensor_types(tiny_export):
    bundle, notes = tiny_export
    assert _check_types(bundle) == 0
    # The counts in the manifest (from llama.cpp's log) match the file.
    counts: dict[str, int] = {}
    for kind, _ in _types(bundle).values():
        counts[kind] = counts.get(kind, 0) + 1
    assert notes.quantization["tensor_types"] == counts


@pytest.mark.slow
def test_wide_export_uses_the_q4_k_m_mix(wide_export):
    bundle, notes = wide_export
    assert _check_types(bundle) > 0
    types = notes.quantization["tensor_types"]
    assert types.get("q4_K", 0) > 0 and types.get("q6_K", 0) > 0  # Q4_K_M: q6_K for output and some ffn_down/attn_v
    assert notes.quantization["fallback_tensors"] == 0 and notes.notes == ()


@pytest.mark.slow
def test_export_is_reproducible(wide_phi3, wide_export, tmp_path):
    _export(wide_phi3, tmp_path / "again")
    first, _ = wide_export
    for name in ("model.gguf", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (first / name).read_bytes(), name


@pytest.mark.slow
def test_converter_failure_names_the_cause(tiny_phi3, tmp_path):
    from edgekit.checkpoint import resolve
    from edgekit.errors import ToolFailed

    broken = tmp_path / "broken"
    shutil.copytree(tiny_phi3, broken)
    (broken / "tokenizer.model").unlink()  # the Phi-3 converter needs the SentencePiece model
    (tmp_path / "out").mkdir()
    with pytest.raises(ToolFailed, match="convert_hf_to_gguf.py failed.*tokenizer.model"):
        gguf_fmt.export(resolve(str(broken)), tmp_path / "out", gguf_fmt.parse_recipe({}, "t"), NullProgress())
    assert list((tmp_path / "out").iterdir()) == []


# --- session -------------------------------------------------------------------------------


@pytest.mark.slow
def test_session_reads_the_model_instead_of_mapping_it(session):
    """Mapped, a model whose weights llama.cpp repacks stays resident twice (llama.cpp issue
    16761: 15.2 GiB for Phi-3-medium's 8.0 GiB); every edgekit session (verify, bench, run, eval)
    reads it, and the bundle README says how to run it the same way."""
    import llama_cpp

    from edgekit.formats.gguf_q4km.readme import README_TEMPLATE

    assert session._llm.model_params.load_mode == llama_cpp.LLAMA_LOAD_MODE_NONE
    assert "--no-mmap" in README_TEMPLATE and "use_mmap=False" in README_TEMPLATE


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_prompt_ids_match_transformers(session, hf_tokenizer, messages):
    expected = list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    assert session.chat_prompt_ids(messages) == expected


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(session, hf_tokenizer, text):
    assert session.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert session.decode(session.encode(text)) == hf_tokenizer.decode(
        hf_tokenizer.encode(text, add_special_tokens=False)
    )


@pytest.mark.slow
def test_encode_parses_special_tokens(session, hf_tokenizer):
    end = hf_tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in session.encode("done<|end|>")


@pytest.mark.slow
def test_text_stream_holds_back_split_characters(session):
    ids = session.encode("東京 café")  # not in the tiny vocabulary: byte-fallback tokens, 1 byte each
    stream = session.text_stream()
    pieces = [stream.feed(t) for t in ids] + [stream.flush()]
    # Streaming keeps the SentencePiece leading space that decode() drops.
    assert "".join(pieces) in (session.decode(ids), " " + session.decode(ids))
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.slow
def test_generate_is_greedy_and_streams(session, tiny_export):
    import llama_cpp

    prompt = session.chat_prompt_ids(CONVERSATIONS[0])
    pieces: list[str] = []
    first = session.generate(prompt, 12, on_text=pieces.append, ignore_eos=True)
    assert first.stopped_by == "max_tokens" and len(first.token_ids) == 12
    assert first.prompt_tokens == len(prompt)
    assert "".join(pieces) == first.text
    assert session.generate(prompt, 12, ignore_eos=True) == first  # no state leaks between calls

    # The same ids as llama-cpp-python's own greedy sampler, without edgekit.
    llm = llama_cpp.Llama(model_path=str(tiny_export[0] / "model.gguf"), n_ctx=256, verbose=False)
    try:
        theirs = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(tok)
            if len(theirs) == 12:
                break
    finally:
        llm.close()
    assert tuple(theirs) == first.token_ids


@pytest.mark.slow
def test_generate_stops_at_end_of_generation(session):
    """With ignore_eos off, the first end-of-generation token ends the run and is not kept."""
    import llama_cpp

    prompt = session.chat_prompt_ids(CONVERSATIONS[1])
    full = session.generate(prompt, 40, ignore_eos=True)
    vocab = llama_cpp.llama_model_get_vocab(session._llm.model)
    eog = [i for i, t in enumerate(full.token_ids) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    stopped = session.generate(prompt, 40)
    if eog:
        assert stopped.stopped_by == "eos" and stopped.token_ids == full.token_ids[: eog[0]]
    else:
        assert stopped == full


@pytest.mark.slow
def test_generate_rejects_overlong_requests(session):
    with pytest.raises(BadInput, match="context"):
        session.generate([1, 2, 3], session.context)
    with pytest.raises(BadInput):
        session.generate([], 4)


def test_open_session_needs_a_model(tmp_path):
    with pytest.raises(BadInput, match="model.gguf"):
        gguf_fmt.open_session(tmp_path, {})


# --- every claimed architecture, from a tiny checkpoint ------------------------------------------


def _families_by_architecture() -> dict[str, str]:
    from edgekit.tiny import FAMILIES

    found: dict[str, str] = {}
    for fam in FAMILIES.values():
        if not fam.unbuildable:
            found.setdefault(fam.architecture, fam.name)
    return found


def test_every_supported_architecture_has_a_tiny_family():
    assert set(_families_by_architecture()) >= gguf_fmt.SUPPORTED_ARCHITECTURES


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(gguf_fmt.SUPPORTED_ARCHITECTURES - {"Phi3ForCausalLM"}))
def test_tiny_family_exports_and_matches_transformers(architecture, tmp_path):
    from transformers import AutoTokenizer

    from edgekit.tiny import make_tiny

    ckpt = make_tiny(_families_by_architecture()[architecture], tmp_path / "ckpt")
    notes = _export(ckpt, tmp_path / "bundle")
    assert sum(notes.quantization["tensor_types"].values()) > 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "bundle")
    with gguf_fmt.open_session(tmp_path / "bundle", {}) as s:
        for messages in CONVERSATIONS:
            expected = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            assert s.chat_prompt_ids(messages) == expected
        for text in TEXTS:
            assert s.encode(text) == tok.encode(text, add_special_tokens=False), text
        gen = s.generate(s.chat_prompt_ids(CONVERSATIONS[0]), 6)
        assert 1 <= len(gen.token_ids) <= 6
