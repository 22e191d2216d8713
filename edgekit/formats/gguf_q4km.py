"""gguf-q4_k_m: a GGUF file in llama.cpp's Q4_K_M mix, run with llama-cpp-python.

Export path (both steps are llama.cpp's own tools, at the runtime's version):

    HF checkpoint --convert_hf_to_gguf.py (subprocess, lazy, f16)--> model-f16.gguf
                  --llama_model_quantize (in process)--------------> model.gguf

The converter writes the tokenizer and the chat template into the GGUF; the HF tokenizer
files are also copied beside it as the reference for users and for the parity check.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import BadInput, OutOfMemory, ToolFailed
from ..measure import ChildWatch
from ..progress import NullProgress
from . import ExportNotes, Generation

# Architectures we claim: each is registered in the converter (conversion/__init__.py
# TEXT_MODEL_MAP) and exported + run by tests/test_gguf.py from an edgekit.tiny checkpoint.
SUPPORTED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM",     # Llama 2/3, SmolLM2
    "MistralForCausalLM",   # converted by the llama converter class
    "Qwen2ForCausalLM",
    "Phi3ForCausalLM",      # Phi-3 / 3.5 / 4-mini: fused qkv and gate_up stay fused (attn_qkv, ffn_up)
    "PhiMoEForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
})

MODEL_FILE = "model.gguf"
PATH_TAKEN = "convert_hf_to_gguf+llama_model_quantize"
# Small files that let transformers (and people) load the reference tokenizer and chat
# template from the bundle. config.json is left out on purpose: with it the bundle would
# look like a loadable HF checkpoint, which it is not.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
DEFAULT_CONTEXT = 4096

# What the long-context probe (edgekit.longcontext) names when parity stops early, by where.
LONG_CONTEXT_LIMITS: dict[str, str] = {
    # llama.cpp picks LongRoPE's factors once per context: the long ones at every position
    # when n_ctx exceeds the original context. A run that crosses token {boundary} with a
    # context sized for it therefore differs from transformers before the boundary.
    "before": ("llama.cpp uses LongRoPE's long factors at every position once n_ctx exceeds {boundary}, so "
               "the tokens of a run before {boundary} differ from transformers; edgekit run and bench open "
               "the context at {boundary} when prompt + output fit in it"),
    "after": "llama.cpp leaves transformers' behaviour past token {boundary}: parity holds to {reach} tokens",
}
# Architectures whose llama.cpp graph is known to compute something other than transformers,
# named by the export notes and by the parity gate when it fails. One row per architecture.
KNOWN_DIFFERENCES: dict[str, str] = {
    # Measured on edgekit.tiny's phimoe exported to F32: KLD 1.1 against transformers; with
    # transformers patched to RMSNorm + softmax top-2 routing, KLD 0.006. llama.cpp 0.3.36
    # builds PhiMoE with its Phi-3 graph (src/models/models.h: phimoe's graph is phi3's).
    "PhiMoEForCausalLM": (
        "llama.cpp (llama-cpp-python 0.3.36) runs PhiMoE through its Phi-3 graph: RMSNorm where transformers' "
        "PhiMoE uses LayerNorm, softmax top-2 routing with renormalised weights where it uses SparseMixer, and "
        "the converter's sqrt(1 + ln(s)/ln(n_orig)) attention factor instead of rope_scaling's short/long_mscale"),
}
_INTERMEDIATES = ("f16", "bf16", "f32")
# "none": llama.cpp's plain quantizers; "calibration": an importance matrix computed from the
# reference model over edgekit/data/calibration.txt (edgekit/imatrix.py) weights the rounding.
IMATRIX_SOURCES = ("none", "calibration")
# K-quants need rows that are a multiple of 256 values (QK_K).
_K_BLOCK = 256


@dataclass(frozen=True)
class GgufRecipe:
    intermediate: str = "f16"
    quant_type: str = "Q4_K_M"
    quant_threads: int = 0
    imatrix: str = "none"

    @property
    def ftype_name(self) -> str:
        # F32 is llama.cpp's one "ALL_" type: unquantized, for architecture parity baselines.
        return "LLAMA_FTYPE_ALL_F32" if self.quant_type == "F32" else f"LLAMA_FTYPE_MOSTLY_{self.quant_type}"

    @property
    def ftype(self) -> int:
        import llama_cpp

        return getattr(llama_cpp, self.ftype_name)


def parse_recipe(table: dict[str, Any], where: str) -> GgufRecipe:
    from ..targets import dataclass_from_table

    recipe = dataclass_from_table(GgufRecipe, table, where)
    if recipe.intermediate not in _INTERMEDIATES:
        raise BadInput(f"{where}: intermediate must be one of {', '.join(_INTERMEDIATES)}, got {recipe.intermediate!r}",
                       "Use \"f16\" unless the model overflows in f16")
    if recipe.imatrix not in IMATRIX_SOURCES:
        raise BadInput(f"{where}: imatrix must be one of {', '.join(IMATRIX_SOURCES)}, got {recipe.imatrix!r}",
                       "Use \"calibration\" (importance matrix from the reference model) or \"none\"")
    if recipe.quant_threads < 0:
        raise BadInput(f"{where}: quant_threads must be 0 (all cores) or more, got {recipe.quant_threads}",
                       "Fix quant_threads")
    try:
        recipe.ftype
    except AttributeError:
        raise BadInput(f"{where}: llama.cpp has no quantization type {recipe.quant_type!r}",
                       "Use a llama_ftype name without the LLAMA_FTYPE_MOSTLY_ prefix, e.g. Q4_K_M") from None
    except ImportError:
        raise BadInput("llama-cpp-python is not installed", "pip install 'edgekit[runtimes]' to export GGUF") from None
    return recipe


def tool_versions() -> dict[str, str]:
    from ..llamacpp_tools import converter_info, runtime_version

    info = converter_info()
    versions = {"llama-cpp-python": runtime_version()}
    if info:
        commit = info.get("llama_cpp_commit") or "unknown commit"
        versions["convert_hf_to_gguf"] = f"llama.cpp {commit} (llama-cpp-python {info['llama_cpp_python']} sdist)"
        versions["gguf-py"] = info.get("gguf_py", "unknown")
    return versions


# ---------------------------------------------------------------------------------------
# export


def export(checkpoint, staging: Path, recipe: GgufRecipe, progress=None) -> ExportNotes:
    """Convert to an intermediate GGUF, quantize it to model.gguf, copy the tokenizer files."""
    from ..llamacpp_tools import converter_dir

    progress = progress or NullProgress()
    staging = Path(staging)
    tools_root = converter_dir(progress)
    intermediate = staging / f"model-{recipe.intermediate}.gguf"
    final = staging / MODEL_FILE
    importance, imatrix_info = None, None
    try:
        _convert(checkpoint, tools_root, intermediate, recipe.intermediate, progress)
        if recipe.imatrix == "calibration":
            importance, imatrix_info = _importance(checkpoint, intermediate, progress)
        tensor_types, fallbacks, accepted = _quantize(intermediate, final, recipe, progress, importance)
        if imatrix_info is not None:
            imatrix_info["accepted_by_llama_cpp"] = accepted
    finally:
        intermediate.unlink(missing_ok=True)  # 2 bytes/weight: never leave it in a bundle
    copied = _copy_tokenizer_files(Path(checkpoint.path), staging)
    from ..modelfile import write_modelfile

    family = write_modelfile(Path(checkpoint.path), staging, MODEL_FILE)

    notes = list(_fallback_notes(fallbacks))
    if checkpoint.architecture in KNOWN_DIFFERENCES:
        notes.append(f"known difference from transformers: {KNOWN_DIFFERENCES[checkpoint.architecture]}")
    if family is None:
        notes.append("Modelfile has no TEMPLATE: the chat template is not a family edgekit translates for Ollama")
    if imatrix_info is not None:
        notes.append(f"importance matrix from {imatrix_info['tokens']} calibration tokens weighted "
                     f"{imatrix_info['tensors']} tensors")
    if read_metadata(final, ())["chat_template"] is None:
        if _has_chat_template(Path(checkpoint.path)):
            raise ToolFailed("the converter wrote no tokenizer.chat_template into the GGUF although the checkpoint has one",
                             "Report this with the checkpoint's tokenizer_config.json")
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


def _convert(checkpoint, tools_root: Path, out: Path, outtype: str, progress) -> None:
    """Run convert_hf_to_gguf.py; its log (one line per tensor, then a tqdm bar) drives the bars."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # would make it import the installed gguf instead of its own
    gguf_py = str(tools_root / "gguf-py")
    env["PYTHONPATH"] = gguf_py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(tools_root / "convert_hf_to_gguf.py"), str(checkpoint.path),
           "--outtype", outtype, "--outfile", str(out), "--model-name", gguf_model_name(checkpoint)]
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
        raise ToolFailed(f"convert_hf_to_gguf.py failed on {checkpoint.path}: {_last_error(tail)}",
                         f"For its full log run: PYTHONPATH={shlex.quote(gguf_py)} {shlex.join(cmd)}")


# llama.cpp keys one tokenizer behaviour on general.name: when the name contains "phi3" or
# "phi-3" it strips the whitespace after every special token (llama-vocab.cpp), copying the
# rstrip=True chat tokens of Microsoft's Phi-3 tokenizer. Left to the converter, the name comes
# from the directory or config, so the same weights tokenize differently depending on where
# they sit. We name the model ourselves and make the name tell llama.cpp what the HF tokenizer
# actually does.
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)


def gguf_model_name(checkpoint) -> str:
    """general.name for the GGUF: the hub name or directory name, adjusted for the quirk above."""
    name = checkpoint.hub_id.split("/")[-1] if checkpoint.hub_id else Path(checkpoint.path).name
    rstrip = special_tokens_rstrip(Path(checkpoint.path))
    if rstrip is False and _PHI3_NAME.search(name):
        name = _PHI3_NAME.sub(lambda m: m.group(0)[:3] + " 3", name)  # "tiny-phi3" -> "tiny-phi 3"
    elif rstrip is True and checkpoint.architecture in ("Phi3ForCausalLM", "PhiMoEForCausalLM") \
            and not _PHI3_NAME.search(name):
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


def _records(stream) -> Iterator[str]:
    """Lines of a child's output, splitting on '\\r' too (tqdm redraws its bar with '\\r')."""
    buf = b""
    while chunk := stream.read1(65536):
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


def _count_checkpoint_tensors(checkpoint) -> int | None:
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


# llama-quant.cpp logs "[  12/ 272]  blk.0.ffn_up.weight - [  576,  1536, 1, 1], type =    f16,
# converting to q5_0 .. size = ..." (or just "size = ..." for a tensor kept as is).
_QUANT_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+)")
_CONVERTING = re.compile(r"converting to (\w+)")
_IMATRIX_LINE = re.compile(r"have importance matrix data with (\d+) entries")
_FALLBACK = re.compile(r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\).*"
                       r"falling back to\s+(\S+)")


def _importance(checkpoint, intermediate: Path, progress):
    """imatrix entries under the intermediate GGUF's tensor names, and what the manifest records."""
    from .. import imatrix as im

    data = im.load_or_compute(checkpoint, progress=progress)
    with progress.step("imatrix: map to GGUF tensors"):
        arch, n_blocks, rows = im.gguf_layout(intermediate)
        entries, unmatched = im.gguf_entries(data, arch, n_blocks, rows)
    if not entries:
        raise ToolFailed(f"none of the {len(data.values)} imatrix entries maps to a tensor of this {arch!r} GGUF",
                         "Export with --set imatrix=none")
    info = {**data.summary(), "tensors": len(entries), "unmatched_modules": unmatched}
    return entries, info


def _quantize(src: Path, dst: Path, recipe: GgufRecipe, progress,
              importance: dict[str, Any] | None = None) -> tuple[dict[str, str], list[tuple[str, int, str, str]], int]:
    """llama_model_quantize in process. Returns each tensor's type in the output, read from
    llama.cpp's log (gguf's GGUFReader takes seconds on a large vocabulary), and the tensors
    that fell back from a K-quant: (name, row length, wanted type, type used). `importance`
    (GGUF tensor name -> mean squared input per column) is handed over as the imatrix; the
    last value is how many entries llama.cpp reported receiving (0 without)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = recipe.ftype
    params.nthread = recipe.quant_threads
    keepalive = None
    if importance:
        from ..imatrix import LlamaImatrix

        keepalive = LlamaImatrix(importance)  # must outlive the C call
        params.imatrix = keepalive.pointer
    types: dict[str, str] = {}
    fallbacks: list[tuple[str, int, str, str]] = []
    with progress.step(f"quantize {recipe.quant_type}") as step, _LlamaLog() as log:
        last: list[str] = []
        accepted = [0]

        def on_line(line: str) -> None:
            if m := _QUANT_LINE.match(line):
                step.update(int(m.group(1)), int(m.group(2)))
                converted = _CONVERTING.search(line, m.end())
                types[m.group(3)] = converted.group(1) if converted else m.group(4)
                last[:] = [m.group(3)]
            elif last and (converted := _CONVERTING.search(line)):
                # With an imatrix, llama.cpp breaks a tensor's line with "====== did not find
                # weights for token_embd.weight": its "converting to" comes on a later line.
                types[last[0]] = converted.group(1)
            if m := _FALLBACK.search(line):
                fallbacks.append((m.group(1), int(m.group(2)), m.group(4), m.group(5)))
            if m := _IMATRIX_LINE.search(line):
                accepted[0] = int(m.group(1))

        log.on_line = on_line
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keepalive
    if rc != 0 or not dst.is_file():
        raise ToolFailed(f"llama_model_quantize to {recipe.quant_type} failed: {log.first_error() or f'code {rc}'}",
                         "Check free disk space; the message above is llama.cpp's")
    return types, fallbacks, accepted[0]


class _LlamaLog:
    """Routes llama.cpp's log to Python while quantizing: per-tensor lines drive the bar and
    fallback warnings become notes instead of pages of stderr. llama.cpp's logger is one
    global, so the previous callback (llama-cpp-python's) is put back afterwards."""

    def __init__(self) -> None:
        self.on_line: Callable[[str], None] = lambda line: None
        self.lines: deque[str] = deque(maxlen=60)
        self._buf = ""

    def __enter__(self) -> "_LlamaLog":
        import llama_cpp

        self._prev_cb, self._prev_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(self._prev_cb), ctypes.byref(self._prev_data))
        self._cb = llama_cpp.llama_log_callback(self._receive)  # must outlive the C call
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def _receive(self, level: int, text: bytes, user_data) -> None:
        try:
            self._buf += text.decode("utf-8", "replace")
            *done, self._buf = self._buf.split("\n")
            for line in done:
                if line.strip():
                    self.lines.append(line)
                    self.on_line(line)
        except Exception:  # noqa: BLE001 - an exception cannot cross the C callback
            pass

    def first_error(self) -> str:
        """The root cause: llama.cpp logs it first, then each caller up the stack adds a
        vaguer "failed to load model" line."""
        for line in self.lines:
            if any(word in line.lower() for word in ("error", "failed", "bad ", "invalid")):
                return line.strip()
        return self.lines[-1].strip() if self.lines else ""

    def __exit__(self, *exc) -> None:
        import llama_cpp

        llama_cpp.llama_log_set(self._prev_cb, self._prev_data)


def _fallback_notes(fallbacks: list[tuple[str, int, str, str]]) -> Iterator[str]:
    if not fallbacks:
        return
    by_change = Counter((wanted, used) for _, _, wanted, used in fallbacks)
    rows = sorted({ncols for _, ncols, _, _ in fallbacks})
    changes = ", ".join(f"{n} x {wanted} -> {used}" for (wanted, used), n in sorted(by_change.items()))
    yield (f"{len(fallbacks)} tensors fell back from K-quants because their row length "
           f"({', '.join(map(str, rows))}) is not a multiple of {_K_BLOCK}: {changes}")


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


def read_metadata(path: Path, keys: Sequence[str]) -> dict[str, str | None]:
    """GGUF metadata as llama.cpp itself reads it, plus "chat_template". "{arch}" in a key
    stands for general.architecture. Loads the vocabulary only (~0.2 s), where gguf's
    pure-Python reader walks every token string (seconds)."""
    import llama_cpp

    with _LlamaLog() as log:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ToolFailed(f"llama.cpp could not read {path}: {log.first_error()}",
                         "Re-export the bundle; check that llama-cpp-python is the version it was built with")
    try:
        def value(key: str) -> str | None:
            size = 256
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
                if n < size:
                    break
                size = n + 1
            return buf.value.decode("utf-8", "replace") if n >= 0 else None

        arch = value("general.architecture") or ""
        out = {key: value(key.replace("{arch}", arch)) for key in keys}
        template = llama_cpp.llama_model_chat_template(model, None)
        out["chat_template"] = template.decode("utf-8") if template else None
        return out
    finally:
        llama_cpp.llama_model_free(model)


# ---------------------------------------------------------------------------------------
# session


def open_session(bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None,
                 *, context: int = DEFAULT_CONTEXT) -> "LlamaCppSession":
    """Open the bundle's model.gguf with llama-cpp-python. `context` bounds prompt + output
    tokens; the model's training context is not used as the default because it sizes the KV
    cache (a 128k-context model would reserve gigabytes)."""
    model = Path(bundle_dir) / MODEL_FILE
    if not model.is_file():
        raise BadInput(f"{bundle_dir} has no {MODEL_FILE}", "Pass a gguf-q4_k_m bundle directory made by edgekit export")
    trained = _trained_context(model)
    return LlamaCppSession(model, threads=threads, context=min(context, trained) if trained else context)


def longrope_context_note(model: Path, context: int) -> str | None:
    """What a context above LongRoPE's original one changes in llama.cpp, or None. edgekit
    run opens DEFAULT_CONTEXT (4096, the Phi models' original context), where the factors are
    those transformers uses for such lengths; a benchmark profile may ask for more."""
    # The converter writes original_context_length for every Phi-3, but the attention factor
    # only in its LongRoPE (and YaRN) branch: that is what says the factors switch.
    value = read_metadata(model, ("{arch}.rope.scaling.original_context_length", "{arch}.rope.scaling.attn_factor"))
    original = value["{arch}.rope.scaling.original_context_length"]
    longrope = value["{arch}.rope.scaling.attn_factor"] is not None
    if longrope and original and original.isdigit() and context > int(original):
        return (f"context {context} > {original}: llama.cpp applies LongRoPE's long factors at every position "
                f"(transformers uses the short ones for sequences of up to {original} tokens); speed and memory "
                "are what they would be either way")
    return None


def _trained_context(model: Path) -> int | None:
    """<arch>.context_length: a context past it only invites garbage (and a llama.cpp warning)."""
    value = read_metadata(model, ("{arch}.context_length",))["{arch}.context_length"]
    return int(value) if value and value.isdigit() else None


def _default_threads() -> int:
    # llama-cpp-python's own default is cpu_count // 2, one thread on a 2-core machine.
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class _TextStream:
    """Token ids -> text pieces. A UTF-8 character can span tokens (byte-fallback pieces, or
    byte-level BPE splitting an emoji): its bytes are held back until it is complete."""

    def __init__(self, piece: Callable[[int], bytes]):
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class LlamaCppSession:
    """A model.gguf open in llama.cpp, talking token ids.

    encode() parses special tokens and never adds BOS (the Session contract); chat prompts
    get the runtime's BOS rule instead, see chat_prompt_ids().
    """

    def __init__(self, model_path: Path, threads: int | None, context: int):
        import llama_cpp

        n = threads or _default_threads()
        self._lib = llama_cpp
        # llama-cpp-python maps llama.cpp's log levels off by one (ggml's WARN=3 is its ERROR)
        # and so prints warnings even with verbose=False; capturing the log keeps stderr clean and gives load errors a reason.
        with _LlamaLog() as log:
            try:
                self._llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=context, n_threads=n,
                                            n_threads_batch=n, verbose=False, logits_all=False)
            except ValueError as e:
                raise ToolFailed(f"llama.cpp could not load {model_path}: {log.first_error() or e}",
                                 "Re-export the bundle; check that llama-cpp-python is the version it was built with") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.context = context
        self._model_path, self._threads = model_path, threads

    # tokenizer -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The runtime tokenizer's ids: special tokens written in text are parsed as such, and
        no BOS is added even when the vocabulary asks for one (callers add it if they want)."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: Sequence[int]) -> str:
        """llama.cpp's detokenizer: control tokens render as nothing, and a SentencePiece
        vocabulary's leading space is dropped, as transformers' decode does."""
        arr = (self._lib.llama_token * len(ids))(*ids)
        size = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n  # too small: llama.cpp returns the size it needs, negated
        raise ToolFailed("llama_detokenize failed")

    def _piece(self, token: int) -> bytes:
        # llama-cpp-python's helpers use a fixed 32-byte buffer and silently truncate longer
        # pieces (long runs of spaces in code vocabularies); grow the buffer instead.
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def text_stream(self) -> "_TextStream":
        return _TextStream(self._piece)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    # chat --------------------------------------------------------------------------------

    def chat_template(self) -> str | None:
        raw = self._lib.llama_model_chat_template(self._llm.model, None)
        return raw.decode("utf-8") if raw else None

    def chat_prompt_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Render the GGUF's own chat template with llama-cpp-python's Jinja2ChatFormatter
        (bos/eos strings from the GGUF vocabulary), then tokenize with special tokens parsed.

        BOS follows llama.cpp's rule (llama-server, llama-cli): prepended when the vocabulary
        asks for it (tokenizer.ggml.add_bos_token) and the rendered text does not already start
        with it. transformers' apply_chat_template never adds one, so the two differ only for a
        template without {{ bos_token }} in a tokenizer that adds BOS.
        """
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.chat_template()
        if template is None:
            raise BadInput("this bundle's GGUF has no chat template", "Prompt it with raw text (--raw)")
        bos, eos = self._lib.llama_vocab_bos(self._vocab), self._lib.llama_vocab_eos(self._vocab)
        formatter = Jinja2ChatFormatter(template=template, bos_token=self._token_text(bos),
                                        eos_token=self._token_text(eos),
                                        add_generation_prompt=add_generation_prompt)
        text = formatter(messages=messages).prompt
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if bos >= 0 and self._lib.llama_vocab_get_add_bos(self._vocab) and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    # generation --------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[int], max_tokens: int,
                 on_text: Callable[[str], None] | None = None, ignore_eos: bool = False) -> Generation:
        """Greedy decoding: argmax over the logits, no sampler chain, so no penalties or
        temperature can creep in. The end-of-generation token (EOS, <|end|>, <|im_end|>, ...)
        ends the run and is not part of token_ids or text (as in the ONNX session). text is the concatenation of what
        on_text received; it keeps the leading space of the first piece, as llama.cpp streams it."""
        import numpy as np

        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise BadInput("the prompt has no tokens", "Pass a non-empty prompt")
        if len(prompt) + max_tokens > self.context:
            raise BadInput(f"{len(prompt)} prompt tokens + {max_tokens} new tokens exceed the context of {self.context}",
                           "Shorten the prompt or lower --max-tokens")
        llm, lib = self._llm, self._lib
        stream = self.text_stream()
        out: list[int] = []
        pieces: list[str] = []
        stopped_by = "max_tokens"

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_text:
                    on_text(text)

        llm.reset()
        llm.eval(prompt)
        for i in range(max_tokens):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(self._n_vocab,))
            token = int(logits.argmax())
            if lib.llama_vocab_is_eog(self._vocab, token) and not ignore_eos:
                stopped_by = "eos"
                break
            out.append(token)
            emit(stream.feed(token))
            if i + 1 < max_tokens:  # the last token needs no forward pass
                llm.eval([token])
        emit(stream.flush())
        return Generation(token_ids=tuple(out), text="".join(pieces), prompt_tokens=len(prompt), stopped_by=stopped_by)

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        """Teacher-forced logits [len(ids), n_vocab] for every position, one forward pass per
        n_batch chunk. Uses llama.cpp's batch API directly: Llama(logits_all=True) would
        allocate n_ctx x n_vocab floats for every session, not only for parity runs."""
        import numpy as np

        lib, ctx = self._lib, self._llm.ctx
        ids = [int(t) for t in ids]
        if len(ids) > self.context:
            raise BadInput(f"{len(ids)} tokens exceed the context of {self.context}", "Use a shorter evaluation window")
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        self._llm.reset()
        n_batch = max(1, int(lib.llama_n_batch(ctx)))
        out = np.empty((len(ids), self._n_vocab), dtype=np.float32)
        for start in range(0, len(ids), n_batch):
            chunk = ids[start:start + n_batch]
            self._decode(chunk, start, every_row=True)
            rows = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(len(chunk) * self._n_vocab,))
            out[start:start + len(chunk)] = rows.reshape(len(chunk), self._n_vocab)
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        return out

    def stepwise_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int]) -> "np.ndarray":
        """Logits the way an application meets them: the prompt in one batch, then the
        continuation one token at a time. Rows: the prompt's last position, then one per
        continuation token but the last ([len(continuation), n_vocab]).

        The context is sized to the whole sequence, as `llama-cli -c N` would be. That choice
        is what picks LongRoPE's factors in llama.cpp (long at every position once n_ctx
        exceeds the original context), so a larger session is opened for it when needed."""
        import numpy as np

        needed = len(prompt_ids) + len(continuation)
        if needed > self.context:
            with LlamaCppSession(self._model_path, self._threads, needed) as wide:
                return wide.stepwise_logits(prompt_ids, continuation)
        lib, ctx = self._lib, self._llm.ctx
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        self._llm.reset()
        rows = np.empty((len(continuation), self._n_vocab), dtype=np.float32)
        tokens = [int(t) for t in prompt_ids]
        n_batch = max(1, int(lib.llama_n_batch(ctx)))
        for start in range(0, len(tokens), n_batch):   # the prompt, logits for its last token only
            chunk = tokens[start:start + n_batch]
            self._decode(chunk, start, last_row=start + len(chunk) == len(tokens))
        rows[0] = self._last_logits()
        for i, tok in enumerate(continuation[:-1]):
            self._decode([int(tok)], len(tokens) + i, last_row=True)
            rows[i + 1] = self._last_logits()
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        return rows

    def _decode(self, chunk: Sequence[int], start: int, *, every_row: bool = False, last_row: bool = False) -> None:
        """One llama_decode of `chunk` at positions start..; logits kept for every row, the
        last one only, or none (a prompt chunk that is not the last)."""
        lib = self._lib
        batch = lib.llama_batch_init(len(chunk), 0, 1)
        try:
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = every_row or (last_row and i == len(chunk) - 1)
            batch.n_tokens = len(chunk)
            if lib.llama_decode(self._llm.ctx, batch) != 0:
                raise ToolFailed("llama_decode failed while computing logits")
        finally:
            lib.llama_batch_free(batch)

    def _last_logits(self) -> "np.ndarray":
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self) -> "LlamaCppSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # benchmarking ------------------------------------------------------------------------

    @classmethod
    def open_offloaded(cls, model_path: Path, threads: int | None, context: int,
                       gpu_layers: int) -> "LlamaCppSession":
        """A session with `gpu_layers` layers on the GPU (-1: all), for device profiles such as
        m-series (Metal). With gpu_layers=0 this is the plain constructor."""
        if not gpu_layers:
            return cls(model_path, threads=threads, context=context)
        import llama_cpp

        self = cls.__new__(cls)
        n = threads or _default_threads()
        self._lib = llama_cpp
        with _LlamaLog() as log:
            try:
                self._llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=context, n_threads=n,
                                            n_threads_batch=n, n_gpu_layers=gpu_layers, verbose=False,
                                            logits_all=False)
            except ValueError as e:
                raise ToolFailed(f"llama.cpp could not load {model_path} with {gpu_layers} GPU layers: "
                                 f"{log.first_error() or e}", "Benchmark a CPU profile instead") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.context = context
        self._model_path, self._threads = model_path, threads
        return self

    def timed_generate(self, prompt_ids: Sequence[int], gen_tokens: int,
                       probe: Callable[[str], None] | None = None) -> tuple[float, float, float, int]:
        """One greedy generation of exactly `gen_tokens` tokens (end-of-generation tokens are
        not special here), timed as llama-bench times llama.cpp: prefill is eval(prompt), decode
        is the single-token evals; token selection (numpy argmax) is outside the timed regions.

        Returns (prefill_s, first_token_s, decode_s, n_generated). first_token_s is prefill plus
        the selection of the first token (time to first token); decode_s covers the
        n_generated - 1 forward passes that produce the tokens after it (the last token needs
        none). probe("prefill") and probe("decode") run after each phase, outside the timing.
        """
        import time

        import numpy as np

        prompt = [int(t) for t in prompt_ids]
        if not prompt or gen_tokens < 1:
            raise BadInput("a timed generation needs a prompt and at least one new token", "Fix the benchmark settings")
        if len(prompt) + gen_tokens > self.context:
            raise BadInput(f"{len(prompt)} prompt tokens + {gen_tokens} new tokens exceed the context of {self.context}",
                           "Lower --prompt-tokens or --gen-tokens")
        llm, lib, n_vocab = self._llm, self._lib, self._n_vocab
        clock = time.perf_counter

        def argmax() -> int:
            return int(np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

        llm.reset()
        t0 = clock()
        llm.eval(prompt)
        prefill_s = clock() - t0
        if probe:
            probe("prefill")
        t0 = clock()
        token = argmax()
        first_token_s = prefill_s + (clock() - t0)
        decode_s, n = 0.0, 1
        while n < gen_tokens:
            t0 = clock()
            llm.eval([token])
            decode_s += clock() - t0
            token = argmax()
            n += 1
        if probe:
            probe("decode")
        return prefill_s, first_token_s, decode_s, n
