"""gguf-q4_k_m export: convert_hf_to_gguf.py (child process), then quantize; tokenizer files beside."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ...errors import OutOfMemory, ToolFailed
from ...measure import ChildWatch
from ...progress import NullProgress, Progress
from .. import ExportCost, ExportNotes
from .limits import KNOWN_DIFFERENCES
from .llamalog import read_metadata
from .quantize import fallback_notes, importance_entries, quantize
from .recipe import MODEL_FILE, PATH_TAKEN, TOKENIZER_FILES, GgufRecipe

if TYPE_CHECKING:
    from ...checkpoint import Checkpoint

# What preflight (edgekit.preflight) reserves for an export: fitted by benchmarks/preflight_fit.py
# on edgekit's exports in benchmarks/results/scale.json (default recipe, importance matrix
# computed, process-tree peaks): SmolLM2-135M 0.72 GiB, Llama-3.2-1B 2.57 GiB (its 128k x 2048
# embedding, 1 GiB in fp32, is the largest tensor the converter and the imatrix pass hold) and
# Phi-3-mini 1.69 GiB shapes (Phi-4-mini's 8.83 GiB row is left out: its imatrix pass held the
# model because this host had the memory free, which it does only below 40 % of what is
# available). The converter streams tensors and the imatrix pass streams the
# checkpoint block by block, so the peak follows the largest tensor and one layer, not the
# model. Disk: the f16 intermediate (0.5x fp32 bytes) beside the Q4_K_M output.
PREFLIGHT_COST = ExportCost(
    ram_fixed_mb=576, ram_per_largest=2.007, ram_per_layer=1.327, disk_fixed_mb=34, disk_per_fp32_byte=0.722
)


def why_not_streamed_export(checkpoint: Checkpoint, recipe: GgufRecipe) -> str | None:
    """Always None: the converter streams tensors, and the importance-matrix pass streams the
    checkpoint block by block whenever holding it would not fit (edgekit.layerwise)."""
    return None


def config_problems(config: dict[str, Any]) -> list[str]:
    """Shapes the export tools mishandle, for tiny test checkpoints to avoid: none known for the
    converter (row lengths that are not a multiple of 256 fall back from K-quants, with a note)."""
    return []


def tool_versions() -> dict[str, str]:
    from ...llamacpp_tools import converter_info, runtime_version

    info = converter_info()
    versions = {"llama-cpp-python": runtime_version()}
    if info:
        commit = info.get("llama_cpp_commit") or "unknown commit"
        versions["convert_hf_to_gguf"] = f"llama.cpp {commit} (llama-cpp-python {info['llama_cpp_python']} sdist)"
        versions["gguf-py"] = info.get("gguf_py", "unknown")
    return versions


def export(checkpoint: Checkpoint, staging: Path, recipe: GgufRecipe, progress: Progress | None = None) -> ExportNotes:
    """Convert to an intermediate GGUF, quantize it to model.gguf, copy the tokenizer files."""
    from ...llamacpp_tools import converter_dir

    progress = progress or NullProgress()
    staging = Path(staging)
    tools_root = converter_dir(progress)
    intermediate = staging / f"model-{recipe.intermediate}.gguf"
    final = staging / MODEL_FILE
    importance, imatrix_info = None, None
    try:
        _convert(checkpoint, tools_root, intermediate, recipe.intermediate, progress)
        if recipe.imatrix == "calibration":
            importance, imatrix_info = importance_entries(checkpoint, intermediate, progress)
        tensor_types, fallbacks, accepted = quantize(intermediate, final, recipe, progress, importance)
        if imatrix_info is not None:
            imatrix_info["accepted_by_llama_cpp"] = accepted
    finally:
        intermediate.unlink(missing_ok=True)  # 2 bytes/weight: never leave it in a bundle
    copied = _copy_tokenizer_files(Path(checkpoint.path), staging)
    from ...modelfile import write_modelfile

    family = write_modelfile(Path(checkpoint.path), staging, MODEL_FILE)

    notes = list(fallback_notes(fallbacks))
    if checkpoint.architecture in KNOWN_DIFFERENCES:
        notes.append(f"known difference from transformers: {KNOWN_DIFFERENCES[checkpoint.architecture]}")
    if family is None:
        notes.append("Modelfile has no TEMPLATE: the chat template is not a family edgekit translates for Ollama")
    if imatrix_info is not None:
        notes.append(
            f"importance matrix from {imatrix_info['tokens']} calibration tokens weighted "
            f"{imatrix_info['tensors']} tensors"
        )
    if read_metadata(final, ())["chat_template"] is None:
        if _has_chat_template(Path(checkpoint.path)):
            raise ToolFailed(
                "the converter wrote no tokenizer.chat_template into the GGUF although the checkpoint has one",
                "Report this with the checkpoint's tokenizer_config.json",
            )
        notes.append("the checkpoint has no chat template: prompt this bundle with raw text (--raw)")
    return ExportNotes(
        quantization={
            "ftype": recipe.ftype_name,
            "tensor_types": dict(sorted(Counter(tensor_types.values()).items())),
            "fallback_tensors": len(fallbacks),
            **({"imatrix": imatrix_info} if imatrix_info is not None else {}),
        },
        tools=tool_versions(),
        path_taken=PATH_TAKEN,
        notes=tuple(notes),
        # Converter and quantizer are deterministic (thread count only splits rows):
        # a rebuild from the same checkpoint gives the same bytes.
        reproducible_files=(MODEL_FILE, *copied, "Modelfile"),
    )


_TENSOR_LINE = re.compile(r"^INFO:hf-to-gguf:(\S+),\s+\S+ --> (\S+), shape = ")
_WRITING = re.compile(r"^Writing:\s+(\d+)%")


def _convert(checkpoint: Checkpoint, tools_root: Path, out: Path, outtype: str, progress: Progress) -> None:
    """Run convert_hf_to_gguf.py; its log (one line per tensor, then a tqdm bar) drives the bars."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # would make it import the installed gguf instead of its own
    gguf_py = str(tools_root / "gguf-py")
    env["PYTHONPATH"] = gguf_py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [
        sys.executable,
        str(tools_root / "convert_hf_to_gguf.py"),
        str(checkpoint.path),
        "--outtype",
        outtype,
        "--outfile",
        str(out),
        "--model-name",
        gguf_model_name(checkpoint),
    ]
    expected = _count_checkpoint_tensors(checkpoint)
    tail: deque[str] = deque(maxlen=60)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    watch = ChildWatch(proc.pid).__enter__()
    try:
        lines = _records(proc.stdout)
        mapped, writing = 0, False
        # Tensors are lazy: the per-tensor lines only plan the file and come in a burst after
        # the converter has imported torch; the reading and casting happen under its tqdm bar.
        with progress.step("convert: map tensors", total=expected) as step:
            for line in lines:
                tail.append(line)
                if _TENSOR_LINE.match(line):
                    mapped += 1
                    # Some architectures add tensors (rope factors) or drop some (tied lm_head).
                    step.update(mapped, max(expected or 0, mapped))
                elif _WRITING.match(line):
                    writing = True
                    break
        if writing:
            with progress.step(f"convert: write {outtype} (%)", total=100) as step:
                for line in lines:
                    tail.append(line)
                    if m := _WRITING.match(line):
                        step.update(int(m.group(1)))
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watch.__exit__(None, None, None)
    if oom := watch.out_of_memory(rc, "convert_hf_to_gguf.py"):
        raise OutOfMemory(oom + "; nothing was published", "Use a machine with more RAM or close other programs")
    if rc != 0 or not out.is_file():
        raise ToolFailed(
            f"convert_hf_to_gguf.py failed on {checkpoint.path}: {_last_error(tail)}",
            f"For its full log run: PYTHONPATH={shlex.quote(gguf_py)} {shlex.join(cmd)}",
        )


# llama.cpp keys one tokenizer behaviour on general.name: when the name contains "phi3" or
# "phi-3" it strips the whitespace after every special token (llama-vocab.cpp), copying the
# rstrip=True chat tokens of Microsoft's Phi-3 tokenizer. Left to the converter, the name comes
# from the directory or config, so the same weights tokenize differently depending on where
# they sit. We name the model ourselves and make the name tell llama.cpp what the HF tokenizer
# actually does.
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)


def gguf_model_name(checkpoint: Checkpoint) -> str:
    """general.name for the GGUF: the hub name or directory name, adjusted for the quirk above."""
    name = checkpoint.hub_id.split("/")[-1] if checkpoint.hub_id else Path(checkpoint.path).name
    rstrip = special_tokens_rstrip(Path(checkpoint.path))
    if rstrip is False and _PHI3_NAME.search(name):
        name = _PHI3_NAME.sub(lambda m: m.group(0)[:3] + " 3", name)  # "tiny-phi3" -> "tiny-phi 3"
    elif (
        rstrip is True
        and checkpoint.architecture in ("Phi3ForCausalLM", "PhiMoEForCausalLM")
        and not _PHI3_NAME.search(name)
    ):
        name = f"{name} (phi3)"
    return name


def special_tokens_rstrip(path: Path) -> bool | None:
    """Whether the HF tokenizer's special added tokens swallow the whitespace after them
    (any rstrip=True); None when the files do not say."""
    flags: list[bool] = []
    try:
        data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        flags = [bool(t.get("rstrip")) for t in data.get("added_tokens", []) if t.get("special")]
    except (OSError, ValueError, AttributeError):
        pass
    if not flags:
        try:
            data = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            flags = [bool(t.get("rstrip")) for t in data.get("added_tokens_decoder", {}).values() if t.get("special")]
        except (OSError, ValueError, AttributeError):
            pass
    return any(flags) if flags else None


def _records(stream: IO[bytes] | None) -> Iterator[str]:
    """Lines of a child's output, splitting on '\\r' too (tqdm redraws its bar with '\\r')."""
    if stream is None:  # Popen without stdout=PIPE: nothing to read
        return
    buf = b""
    while chunk := stream.read1(65536):  # type: ignore[attr-defined]  # a pipe is a BufferedReader
        buf += chunk
        *done, buf = re.split(rb"[\r\n]", buf)
        for raw in done:
            if raw.strip():
                yield raw.decode("utf-8", "replace").rstrip()
    if buf.strip():
        yield buf.decode("utf-8", "replace").rstrip()


def _last_error(lines: Sequence[str]) -> str:
    for line in reversed(lines):
        if "Error" in line or line.startswith(("ERROR", "error")):
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def _count_checkpoint_tensors(checkpoint: Checkpoint) -> int | None:
    """Tensor count from the safetensors headers (8-byte length + JSON), without loading weights."""
    total = 0
    for name in checkpoint.weight_files:
        if not name.endswith(".safetensors"):
            return None
        with open(Path(checkpoint.path) / name, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(1 for key in header if key != "__metadata__")
    return total or None


def _copy_tokenizer_files(src: Path, dst: Path) -> tuple[str, ...]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return tuple(copied)


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False
