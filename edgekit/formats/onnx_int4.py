"""onnx-int4: ONNX with int4 MatMulNBits weights, run by onnxruntime-genai.

Export calls onnxruntime-genai's model builder (`create_model`) in a child Python process.
The child keeps the builder's stdout chatter (print, tqdm, native onnxruntime logs) out of
our stdout, which `--json` owns; its peak memory is returned to the OS when it exits; and the
builder's package (which puts its own directory on sys.path) never loads into ours. The
parent reads the child's output line by line to drive the progress bars and keeps it in a
log whose last lines become the ToolFailed message.

Architectures the builder does not know go through optimum's ONNX exporter and onnxruntime's
MatMulNBitsQuantizer instead; edgekit then writes the genai_config.json the builder would
have written, so both kinds of bundle open the same way.

On either path the child can then re-quantize the MatMulNBits weights itself (recipe keys
weight_search, int8_matmuls, int8_block_size; see requantize()): a zero-point-aware block
search, optionally weighted by an importance matrix from the reference model, and per-
projection int8. The graph the tool built is kept; only weights, widths and block sizes change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import BadInput, OutOfMemory, ToolFailed, UnsupportedArchitecture
from ..measure import ChildWatch
from . import ExportNotes, Generation

# --------------------------------------------------------------------------------------------
# Architectures, as data
# --------------------------------------------------------------------------------------------

# config.json "architectures"[0] -> why the builder (onnxruntime-genai 0.15.2, builder.py's
# dispatch in create_model) handles it and what to know. Every row exports for the CPU EP.
BUILDER_ARCHITECTURES: dict[str, str] = {
    # Phi-3/3.5/4-mini: fused qkv_proj and gate_up_proj. The builder picks its LongRoPE
    # variant itself when max_position_embeddings != original_max_position_embeddings.
    "Phi3ForCausalLM": "Phi3Mini / Phi3MiniLongRoPE",
    # Phi-3-small: block-sparse attention (SparseAttention op, has a CPU kernel); its modeling
    # code is not in transformers, so the checkpoint needs --trust-remote-code.
    "Phi3SmallForCausalLM": "Phi3Small / Phi3SmallLongRoPE, remote code",
    # Llama 2/3.x and SmolLM2: the reference decoder; llama3 rope_scaling handled.
    "LlamaForCausalLM": "Llama",
    # Mistral 7B: Llama layout with sliding-window attention.
    "MistralForCausalLM": "Mistral",
    # Qwen2/2.5: qkv biases, tied embeddings in the small sizes.
    "Qwen2ForCausalLM": "Qwen2",
    "Qwen3ForCausalLM": "Qwen3: q/k norms",
    # Gemma 1/2/3: scaled embeddings, soft-capping (2), sliding-window layers (2, 3).
    "GemmaForCausalLM": "Gemma",
    "Gemma2ForCausalLM": "Gemma2",
    "Gemma3ForCausalLM": "Gemma3 text-only (gemma3_text)",
    # Phi-1/1.5/2: parallel attention + MLP, partial rotary.
    "PhiForCausalLM": "Phi",
    "GraniteForCausalLM": "Granite",
    "OlmoForCausalLM": "OLMo",
    "NemotronForCausalLM": "Nemotron",
    "SmolLM3ForCausalLM": "SmolLM3: NoPE layers",
    "Ernie4_5ForCausalLM": "Ernie 4.5",
    "InternLM2ForCausalLM": "InternLM2, remote code",
    "Lfm2ForCausalLM": "LFM2: conv + attention hybrid",
    "HunYuanDenseV1ForCausalLM": "HunYuan dense",
    "GptOssForCausalLM": "gpt-oss: QMoE experts, symmetric only",
}

# In the builder's dispatch but not offered: they cannot give a CPU int4 text bundle.
BUILDER_EXCLUDED: dict[str, str] = {
    # The builder switches PhiMoE to the CUDA EP ("MoE only supported for CUDA").
    "PhiMoEForCausalLM": "builder forces execution_provider=cuda",
    # Multimodal: the builder writes only the text decoder with exclude_embeds=true, which
    # expects inputs_embeds from a vision/audio encoder that edgekit does not build.
    "Phi3VForCausalLM": "text part only, needs an external embedding model",
    "Phi4MMForCausalLM": "text part only, needs an external embedding model",
    "Gemma3ForConditionalGeneration": "text part only, needs an external embedding model",
    "Qwen2_5_VLForConditionalGeneration": "text part only, needs an external embedding model",
    "WhisperForConditionalGeneration": "speech model, not a causal LM",
}

SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset(BUILDER_ARCHITECTURES)

# What the long-context probe (edgekit.longcontext) names when parity stops early, by where.
LONG_CONTEXT_LIMITS: dict[str, str] = {
    # Measured on tiny phi3-longrope: past the original context onnxruntime-genai 0.15.2
    # switches to the long cos/sin cache for new tokens (an If on the sequence length) but
    # keeps the KV cache it filled with the short factors; transformers recomputes it with
    # the long ones at that point. Matches transformers-without-the-reset to KLD 5e-9.
    "after": ("onnxruntime-genai 0.15.2 keeps the KV cache it computed with LongRoPE's short factors past "
              "token {boundary} (transformers recomputes it with the long factors): parity holds to {reach} "
              "tokens; keep the default context_length, which caps the bundle there"),
    "context": ("the bundle's context is capped at {context} tokens (recipe context_length), where "
                "onnxruntime-genai 0.15.2 would otherwise leave transformers' LongRoPE behaviour"),
}

# What the optimum fallback exports (task text-generation-with-past) into a graph whose KV
# cache is [batch, kv_heads, seq, head_dim] per layer, the layout onnxruntime-genai drives.
# Bloom and GPTBigCode are left out on purpose: their caches are fused or transposed.
FALLBACK_ARCHITECTURES: frozenset[str] = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Phi3ForCausalLM", "PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
    "StableLmForCausalLM", "GPTNeoXForCausalLM", "CohereForCausalLM",
})

# Model types the onnxruntime-genai 0.15.2 runtime accepts in genai_config.json "type"
# (strings in libonnxruntime-genai.so). They all load as a plain decoder-only model; the
# fallback uses the checkpoint's model_type when listed, else "llama" (the same code path).
_GENAI_DECODER_TYPES = frozenset({
    "chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "granite", "internlm2",
    "llama", "mistral", "nemotron", "olmo", "phi", "phi3", "qwen2", "qwen3", "smollm3",
})

# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------

ENGINES = ("auto", "builder", "optimum")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
EMBEDDINGS = ("auto", "float", "int4")
PRECISIONS = ("int4", "fp32")
# How the int4/int8 codes of each MatMul are chosen (see requantize() below).
WEIGHT_SEARCHES = ("builder", "edgekit", "imatrix")
# Per-layer projections int8_matmuls may name (builder and optimum node names).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# algorithm -> (base method, MatMul groups raised to int8). The builder's algo_config takes
# exactly these names (builders/quant_config.py, _LEGACY_ALGO_ALIASES); the fallback reads the
# same table so both paths mean the same thing by a name.
ALGORITHMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "default": ("default", ()),          # MLAS round-to-nearest, every MatMul int4
    "rtn": ("rtn", ()),                  # round-to-nearest (neural-compressor flavour)
    "k_quant": ("k_quant", ()),          # k-quant search of scales, every MatMul int4
    "rtn_last": ("rtn", ("last_matmul",)),
    "k_quant_last": ("k_quant", ("last_matmul",)),
    # + the layers llama.cpp's Q4_K_M also keeps at higher precision (use_more_bits)
    "k_quant_mixed": ("k_quant", ("last_matmul", "mixed_layers")),
    "k_quant_linear": ("k_quant", ("last_matmul", "linear_attn")),
}


@dataclass(frozen=True)
class OnnxRecipe:
    engine: str = "auto"           # "auto" | "builder" | "optimum" (fallback path, forced)
    precision: str = "int4"        # "int4"; "fp32" for a float reference bundle (parity baselines)
    block_size: int = 32           # input channels per quantization block
    accuracy_level: int = 4        # MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    algorithm: str = "k_quant_mixed"  # a key of ALGORITHMS
    is_symmetric: bool = True      # int4 without zero points
    float_lm_head: bool = False    # leave /lm_head/MatMul unquantized
    embeddings: str = "auto"       # "auto": builder default; "float"; "int4" (GatherBlockQuantized)
    weight_search: str = "builder"  # "builder": keep the quantizer's codes; "edgekit"/"imatrix": edgekit re-searches them
    int8_matmuls: tuple[str, ...] = ()  # projections raised to int8 in every layer, on top of the algorithm's choice
    int8_block_size: int = 0       # block size of the int8 MatMuls edgekit writes; 0: block_size
    context_length: int = 0        # longest sequence the bundle accepts; 0: the model's, capped where
                                   # the runtime stops matching transformers (LONG_CONTEXT_LIMITS)


def parse_recipe(table: dict[str, Any], where: str) -> OnnxRecipe:
    from ..targets import dataclass_from_table

    table = dict(table)
    if isinstance(table.get("int8_matmuls"), (list, str)):
        # TOML gives a list, `--set int8_matmuls=v_proj,down_proj` a string ("" for none).
        value = table["int8_matmuls"]
        table["int8_matmuls"] = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
    recipe = dataclass_from_table(OnnxRecipe, table, where)
    for name in recipe.int8_matmuls:
        if name not in PROJECTIONS:
            raise BadInput(f"{where}: int8_matmuls names {name!r}, not a projection",
                           f"Use some of: {', '.join(PROJECTIONS)}")
    checks = (
        ("engine", ENGINES), ("precision", PRECISIONS), ("block_size", BLOCK_SIZES), ("accuracy_level", ACCURACY_LEVELS),
        ("algorithm", tuple(ALGORITHMS)), ("embeddings", EMBEDDINGS), ("weight_search", WEIGHT_SEARCHES),
        ("int8_block_size", (0, *BLOCK_SIZES)),
    )
    for key, allowed in checks:
        value = getattr(recipe, key)
        # bool is an int to Python; `block_size = true` must not pass as 1.
        if value not in allowed or isinstance(value, bool):
            raise BadInput(f"{where}: {key} = {value!r} is not allowed",
                           f"Use one of: {', '.join(str(a) for a in allowed)}")
    if recipe.context_length < 0 or isinstance(recipe.context_length, bool):
        raise BadInput(f"{where}: context_length = {recipe.context_length!r} is not allowed",
                       "Use 0 (the model's, capped for LongRoPE) or a number of tokens")
    if recipe.embeddings == "int4" and ALGORITHMS[recipe.algorithm][0] != "default":
        # Measured: the rtn/k_quant quantizers only take MatMul nodes, so the embedding
        # would silently stay float.
        raise BadInput(f"{where}: embeddings = \"int4\" needs algorithm = \"default\"",
                       f"The {recipe.algorithm} quantizer leaves the embedding Gather in float")
    return recipe


def builder_extra_options(recipe: OnnxRecipe, trust_remote_code: bool) -> dict[str, str]:
    """The one place the typed recipe becomes the builder's untyped extra_options strings.

    Not used on purpose: the builder's own `exclude_lm_head` / `exclude_embeds` REMOVE those
    layers from the graph (hidden states out, inputs_embeds in), which no generate loop can
    run. Keeping a layer in float is `nodes_to_exclude`.
    """
    opts = {
        "block_size": str(recipe.block_size),
        "accuracy_level": str(recipe.accuracy_level),
        "algo_config": recipe.algorithm,
        "is_symmetric": _flag(recipe.is_symmetric),
        "hf_token": "false",                    # local directory: never look for hub credentials
        "hf_remote": _flag(trust_remote_code),  # trust_remote_code for every from_pretrained
    }
    exclude = []
    if recipe.float_lm_head:
        exclude.append("/lm_head/MatMul")
    if recipe.embeddings == "float":
        exclude.append("/model/embed_tokens/Gather")
    if exclude:
        opts["nodes_to_exclude"] = ",".join(exclude)
    if recipe.embeddings == "int4":
        opts["op_types_to_quantize"] = "MatMul/Gather"
    return opts


def _flag(value: bool) -> str:
    return "true" if value else "false"


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

# A rebuild of the same checkpoint with the same tool versions reproduces every file of the
# bundle byte for byte. Measured on this machine: tiny Phi-3 (builder and optimum paths) and
# SmolLM2-135M (builder, 113 MB; optimum, 189 MB) built twice each, all sha256 equal. The
# builder names nodes and initializers deterministically and quantizes with plain numpy; the
# optimum path traces with torch.onnx, also deterministic on CPU. Not claimed across
# versions: a different onnxruntime or builder changes the bytes.

_TOKENIZER_EXTRAS = ("tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                     "vocab.json", "merges.txt")


def export(checkpoint, staging: Path, recipe: OnnxRecipe, progress) -> ExportNotes:
    """Write model.onnx, model.onnx.data, genai_config.json, tokenizer and chat template."""
    engine = choose_engine(checkpoint, recipe)
    notes: list[str] = []
    if clash := builder_lm_head_lookalikes(checkpoint.config):
        notes.append(f"{', '.join(clash)} has as many outputs as the vocabulary ({checkpoint.config.get('vocab_size')}): "
                     "the genai builder would write it as an lm_head, so "
                     + ("the optimum path was used" if engine == "optimum" else "expect the parity gate to fail"))
    requant: dict[str, Any] | None = None
    work = staging.parent / (staging.name + "-onnx-work")  # same disk; stale ones are swept by pid
    work.mkdir()
    try:
        if engine == "builder":
            try:
                requant = _run_builder(checkpoint, staging, work, recipe, progress)
            except _Unsupported as e:
                if recipe.engine == "builder" or checkpoint.architecture not in FALLBACK_ARCHITECTURES:
                    raise UnsupportedArchitecture(
                        f"the onnxruntime-genai builder cannot export {checkpoint.architecture}: {e}",
                        "Try --set engine=optimum, or the gguf-q4_k_m target") from None
                notes.append(f"the genai builder refused this checkpoint ({e}); used the optimum fallback")
                _clear(staging)
                engine = "optimum"
        if engine == "optimum":
            requant = _run_optimum(checkpoint, staging, work, recipe, progress)
            _write_genai_config(checkpoint, staging)
            notes.append("exported with optimum + MatMulNBitsQuantizer (fallback path); "
                         "genai_config.json written by edgekit")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    notes += _complete_bundle_files(checkpoint, staging)
    context, context_note = set_context_length(checkpoint.config, staging / "genai_config.json", recipe.context_length)
    if context_note:
        notes.append(context_note)
    weights = weight_summary(staging / "model.onnx")
    notes += _weight_notes(weights)
    if recipe.precision == "int4" and ALGORITHMS[recipe.algorithm][1] and not weights["matmul_int8"]:
        notes.append(f"algorithm {recipe.algorithm} raises some MatMuls to int8, but none matched "
                     "in this graph: every quantized MatMul is int4")
    path_taken = "genai-builder" if engine == "builder" else "optimum+MatMulNBits"
    quantization = {"path": path_taken, "weights": weights, "context_length": context}
    if engine == "builder":
        quantization["builder_extra_options"] = builder_extra_options(recipe, checkpoint.trust_remote_code)
    if requant:
        quantization["edgekit_requantization"] = requant
        notes += _requant_notes(requant)
    tools = tool_versions()
    if engine == "optimum":
        tools.update(_versions("optimum", "optimum-onnx"))
    return ExportNotes(
        quantization=quantization, tools=tools, path_taken=path_taken, notes=tuple(notes),
        reproducible_files=tuple(sorted(p.name for p in staging.iterdir() if p.is_file())),
    )


def builder_lm_head_lookalikes(config: dict[str, Any]) -> list[str]:
    """Projections the genai builder (0.15.2, base.py has_lm_head) would take for the lm_head:
    it treats every Linear whose out_features equals the vocabulary size as one, and writes
    it as a second lm_head mid-graph. No released model has such a width (Phi-3-mini's widest
    is 16384 against a 32064 vocabulary), small custom ones can: measured on a tiny Phi-4-mini
    shape whose fused qkv_proj had 512 outputs over a 512-token vocabulary, KLD 6.4."""
    cfg = config.get("text_config") or config
    vocab = cfg.get("vocab_size")
    heads = cfg.get("num_attention_heads")
    if not vocab or not heads or not cfg.get("hidden_size"):
        return []
    head = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv = cfg.get("num_key_value_heads") or heads
    inter = cfg.get("intermediate_size") or 0
    widths = {"q_proj": heads * head, "k_proj/v_proj": kv * head, "qkv_proj": (heads + 2 * kv) * head,
              "gate_proj/up_proj": inter, "gate_up_proj": 2 * inter, "o_proj/down_proj": cfg["hidden_size"]}
    return [name for name, width in widths.items() if width == vocab]


def choose_engine(checkpoint, recipe: OnnxRecipe) -> str:
    arch = checkpoint.architecture
    clash = builder_lm_head_lookalikes(checkpoint.config)
    if clash and recipe.engine == "auto" and arch in FALLBACK_ARCHITECTURES:
        return "optimum"   # the builder's graph would be wrong; export() notes why
    if recipe.engine == "optimum" or (recipe.engine == "auto" and arch not in SUPPORTED_ARCHITECTURES):
        if arch not in FALLBACK_ARCHITECTURES:
            why = BUILDER_EXCLUDED.get(arch, "not in its architecture table")
            raise UnsupportedArchitecture(
                f"onnx-int4 cannot export {arch} (genai builder: {why}; optimum fallback: not supported)",
                "Try the gguf-q4_k_m target")
        return "optimum"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(f"the onnxruntime-genai builder does not export {arch}",
                                      "Use --set engine=auto or engine=optimum")
    return "builder"


class _Unsupported(Exception):
    """The builder raised NotImplementedError: it has no code path for this checkpoint."""


def _clear(directory: Path) -> None:
    for p in directory.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _num_layers(config: dict[str, Any]) -> int | None:
    cfg = config.get("text_config") or config
    return cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")


def _run_builder(checkpoint, staging: Path, work: Path, recipe: OnnxRecipe, progress) -> dict[str, Any] | None:
    job = {
        "engine": "builder",
        "input": str(checkpoint.path),
        "output": str(staging),
        "cache_dir": str(work / "cache"),
        "extra_options": builder_extra_options(recipe, checkpoint.trust_remote_code),
        "precision": recipe.precision,
        "requant": requant_job(checkpoint, recipe),
    }
    result = _run_child(job, work, progress, _ChildOutput(_num_layers(checkpoint.config)))
    if result.get("error") == "NotImplementedError":
        raise _Unsupported(result.get("message", ""))
    _raise_on_failure(result, "the onnxruntime-genai model builder")
    return result.get("requant")


def _run_optimum(checkpoint, staging: Path, work: Path, recipe: OnnxRecipe, progress) -> dict[str, Any] | None:
    job = {
        "engine": "optimum",
        "input": str(checkpoint.path),
        "output": str(staging),
        "cache_dir": str(work / "cache"),
        "fp32_dir": str(work / "fp32"),
        "trust_remote_code": checkpoint.trust_remote_code,
        "recipe": {k: getattr(recipe, k) for k in OnnxRecipe.__dataclass_fields__},
        "requant": requant_job(checkpoint, recipe),
    }
    result = _run_child(job, work, progress, _ChildOutput(_num_layers(checkpoint.config)))
    _raise_on_failure(result, "optimum's ONNX export + MatMulNBitsQuantizer")
    return result.get("requant")


def _raise_on_failure(result: dict[str, Any], tool: str) -> None:
    if result.get("ok"):
        return
    tail = "\n".join(result.get("tail", []))
    raise ToolFailed(
        f"{tool} failed ({result.get('error', 'exit code ' + str(result.get('returncode')))}: "
        f"{result.get('message', '')})\n--- last lines of its output ---\n{tail}",
        f"Full log: {result['log']}",
    )


# --- the child process ----------------------------------------------------------------------

# Line ends, plus the start of each k_quant "Progress: [##  ] 18.18%" update, which
# neural-compressor prints without any line break until it finishes.
_LINE_BREAK = re.compile(rb"\r|\n|(?=Progress: \[)")
_PHASE = "@@edgekit-phase "  # a line the child prints to name the step it is starting
_CHILD_BOOT = ("import sys; from edgekit.formats.onnx_int4 import _child_main; "
               "sys.exit(_child_main(sys.argv[1]))")


def _run_child(job: dict[str, Any], work: Path, progress, output: "_ChildOutput") -> dict[str, Any]:
    """Run `job` in a fresh interpreter; stream its output into a log and the progress bars."""
    job_path, result_path, log_path = work / "job.json", work / "result.json", work / "export.log"
    job["result"] = str(result_path)
    job_path.write_text(json.dumps(job), encoding="utf-8")
    package_root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        # Inputs are local directories: nothing in the child may reach the hub.
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    steps = _Steps(progress)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_BOOT, str(job_path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=work)
    watch = ChildWatch(proc.pid).__enter__()
    try:
        steps.start("loading checkpoint")
        with open(log_path, "wb") as log:
            pending = b""
            while chunk := proc.stdout.read1(65536):
                log.write(chunk)
                pending += chunk
                *lines, pending = _LINE_BREAK.split(pending)
                for line in lines:
                    output.feed(line.decode("utf-8", "replace").strip(), steps)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave a converter running
            proc.kill()
            proc.wait()
        watch.__exit__(None, None, None)
        steps.close()
    if oom := watch.out_of_memory(returncode, f"the {job['engine']} child"):
        raise OutOfMemory(oom + "; nothing was published",
                          "Use a machine with more RAM or close other programs; the gguf-q4_k_m target streams the checkpoint")
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"ok": False}
    if returncode != 0:
        result["ok"] = False
    if not result["ok"]:
        result.update(returncode=returncode, tail=_log_tail(log_path), log=str(_keep_log(log_path)))
    return result


def _log_tail(log_path: Path, n: int = 12) -> list[str]:
    """The last lines as a terminal would show them (a tqdm bar redraws with \\r). When the
    child reported a Python exception, the lines before its traceback: the error message
    already names the exception, the lines say what the tool was doing."""
    text = log_path.read_bytes().decode("utf-8", "replace")
    text = text.rsplit("Traceback (most recent call last):", 1)[0] or text
    lines = [ln.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for ln in text.split("\n")]
    return [ln for ln in lines if ln][-n:]


def _keep_log(log_path: Path) -> Path:
    """The work dir is deleted; a failed export's log moves to the edgekit cache."""
    from ..paths import cache_dir

    dest = cache_dir() / "logs" / f"onnx-int4-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log_path, dest)
    return dest


class _Steps:
    """One open progress step at a time, switched as the child's output moves on."""

    def __init__(self, progress):
        self._progress = progress
        self._ctx = self._step = None
        self.name: str | None = None

    def start(self, name: str, total: float | None = None) -> None:
        if name != self.name:
            self.close()
            self._ctx = self._progress.step(name, total)
            self._step = self._ctx.__enter__()
            self.name = name

    def update(self, completed: float, total: float | None = None) -> None:
        if self._step is not None:
            self._step.update(completed, total)

    def advance(self) -> None:
        if self._step is not None:
            self._step.advance(1)

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = self._step = self.name = None


class _ChildOutput:
    """Turns the lines the builder, the quantizer and our child print into progress steps."""

    READING_LAYER = re.compile(r"^Reading layer (\d+)")
    QUANT_PERCENT = re.compile(r"Progress: \[[# ]*\]\s*([\d.]+)%")  # neural-compressor rtn/k_quant
    QUANT_NODE = re.compile(r"^start to quantize (?!model)")        # MLAS default quantizer, INFO log
    SAVING_TENSOR = re.compile(r"^Saving .*\|\s*(\d+)/(\d+)")         # tqdm bar of onnx_ir.save

    def __init__(self, num_layers: int | None):
        self.num_layers = num_layers

    def feed(self, line: str, steps: _Steps) -> None:
        if not line:
            return
        if line.startswith(_PHASE):
            steps.start(line[len(_PHASE):])
        elif m := self.READING_LAYER.match(line):
            steps.start("converting layers", self.num_layers)
            steps.update(int(m.group(1)) + 1)
        elif line.startswith("Saving ONNX model"):
            steps.start("quantizing to int4")
        elif m := self.QUANT_PERCENT.search(line):
            steps.start("quantizing to int4")
            steps.update(float(m.group(1)), 100)
        elif self.QUANT_NODE.match(line):
            steps.start("quantizing to int4")
            steps.advance()
        elif m := self.SAVING_TENSOR.match(line):
            steps.start("writing model.onnx", int(m.group(2)))
            steps.update(int(m.group(1)), int(m.group(2)))
        elif line.startswith(("Saving GenAI config", "Saving processing files")):
            steps.start("writing config and tokenizer")


def _child_main(job_path: str) -> int:
    """Entry point of the child interpreter. Writes {"ok", "error", "message"} to job["result"]."""
    import logging
    import traceback

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
    # Per-node lines from the default quantizer give the quantizing step a counter.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.INFO)
    try:
        report = {"builder": _child_builder, "optimum": _child_optimum}[job["engine"]](job)
        result = {"ok": True, "requant": report}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises ToolFailed
        traceback.print_exc(file=sys.stdout)
        result = {"ok": False, "error": type(e).__name__, "message": str(e)[:2000]}
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


def _child_builder(job: dict[str, Any]) -> dict[str, Any] | None:
    from onnxruntime_genai.models.builder import check_extra_options, create_model

    opts = dict(job["extra_options"])
    # check_extra_options converts the strings to typed values and loads the HF config into
    # opts["hf_details"], which create_model requires: the same two calls the CLI makes.
    precision = job.get("precision", "int4")
    check_extra_options(None, job["input"], job["output"], precision, "cpu", job["cache_dir"], opts)
    create_model(None, job["input"], job["output"], precision, "cpu", job["cache_dir"], **opts)
    if job.get("requant") and precision == "int4":
        source = CheckpointWeights(Path(job["input"]), job["requant"]["qkv_sizes"])
        return requantize(Path(job["output"]) / "model.onnx", source, job["requant"])
    return None


def _child_optimum(job: dict[str, Any]) -> dict[str, Any] | None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from optimum.exporters.onnx import main_export

    fp32, out = Path(job["fp32_dir"]), Path(job["output"])
    print(_PHASE + "exporting to ONNX (optimum)")
    main_export(job["input"], output=fp32, task="text-generation-with-past", device="cpu",
                trust_remote_code=job["trust_remote_code"], local_files_only=True,
                do_validation=False, cache_dir=job["cache_dir"])
    model = onnx.load(str(fp32 / "model.onnx"))
    if job["recipe"].get("precision", "int4") == "int4":
        print(_PHASE + "quantizing to int4")
        quantizer = MatMulNBitsQuantizer(model, **fallback_quantizer_args(job["recipe"], model))
        quantizer.process()
        model = quantizer.model.model
    report = None
    if job.get("requant") and job["recipe"].get("precision", "int4") == "int4":
        report = requantize(model, OnnxWeights(fp32 / "model.onnx"), job["requant"])
    print(_PHASE + "writing model.onnx")
    _save_onnx(model, out / "model.onnx")
    # optimum copies tokenizer, chat template and generation config beside its model.onnx.
    for p in fp32.iterdir():
        if p.is_file() and not p.name.startswith("model.onnx") and p.name != "config.json":
            shutil.copy2(p, out / p.name)
    return report


def _save_onnx(model, path: Path) -> None:
    """model.onnx + one model.onnx.data, as the bundle expects. onnx appends to an existing
    data file, so an old one is removed first (the model must be fully in memory)."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=0)
    os.chmod(data, 0o644)  # onnx writes it 0600, unlike every other bundle file


def fallback_quantizer_args(recipe: dict[str, Any], model) -> dict[str, Any]:
    """MatMulNBitsQuantizer arguments for an optimum graph, meaning what the recipe means to
    the builder. The int8 groups are found by name in optimum's (torch module path) graph."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (KQuantWeightOnlyQuantConfig,
                                                                   RTNWeightOnlyQuantConfig)

    method, groups = ALGORITHMS[recipe["algorithm"]]
    names = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    head = lm_head_matmul(model)
    exclude = [head] if recipe["float_lm_head"] and head else []
    int8 = {n: {"bits": 8} for n in _int8_matmuls(groups, names, head) if n not in exclude}
    configs = {"rtn": RTNWeightOnlyQuantConfig, "k_quant": KQuantWeightOnlyQuantConfig}
    algo = configs[method](customized_weight_config=int8) if method in configs else None
    op_types = ("MatMul", "Gather") if recipe["embeddings"] == "int4" else ("MatMul",)
    return dict(bits=4, block_size=recipe["block_size"], is_symmetric=recipe["is_symmetric"],
                accuracy_level=recipe["accuracy_level"], nodes_to_exclude=exclude,
                op_types_to_quantize=op_types, algo_config=algo)


def lm_head_matmul(model) -> str | None:
    """The MatMul that produces the logits (lm_head in Llama-style graphs, embed_out in GPT-NeoX)."""
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    head = next((n.name for n in matmuls if "logits" in n.output), None)
    return head or next((n.name for n in matmuls if n.name == "/lm_head/MatMul"), None)


_LAYER_MATMUL = re.compile(r"^/model/layers\.(\d+)/(?:self_attn|attn|mlp)/(\w+)/MatMul$")
# The builder raises qkv_proj (it fuses q/k/v) and down_proj; optimum keeps q/k/v apart.
_MORE_BITS_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "down_proj")


def _int8_matmuls(groups: Sequence[str], names: Sequence[str], head: str | None) -> list[str]:
    picked = [head] if "last_matmul" in groups and head else []
    if "mixed_layers" in groups:
        layers = {int(m.group(1)) for n in names if (m := _LAYER_MATMUL.match(n))}
        upgrade = _more_bits_layers(max(layers) + 1) if layers else set()
        for n in names:
            m = _LAYER_MATMUL.match(n)
            if m and int(m.group(1)) in upgrade and m.group(2) in _MORE_BITS_PROJECTIONS:
                picked.append(n)
    return picked


def _more_bits_layers(n: int) -> set[int]:
    """llama.cpp's use_more_bits: first and last eighth of the layers, and every third between."""
    return {i for i in range(n) if i < n / 8 or i >= 7 * n / 8 or (i - round(n / 8)) % 3 == 2}


# --- edgekit re-quantization -----------------------------------------------------------------
#
# The builder's quantizers (MLAS round-to-nearest, neural-compressor's rtn and k_quant) fit
# each block's scale and minimum in float and only then round the minimum to the integer zero
# point MatMulNBits stores, so the rounding they optimised is not the rounding the kernel
# does. requantize() re-searches every block against the error after the zero point is rounded
# (llama.cpp's make_qkx2-style search over 22 scale candidates plus a least-squares refit),
# optionally weighting each input column by the calibration imatrix (edgekit/imatrix.py), and
# applies int8_matmuls. Float weights come from the checkpoint (builder path; each matched
# tensor is checked against the node's own dequantized codes before it is used) or from the
# fp32 graph (optimum path). Nodes it cannot match keep the builder's codes, and the report
# says which. A fused qkv_proj whose q, k and v get different widths is split into one
# MatMulNBits per run of equal width, concatenated back into the fused output.

_NODE_BASE = re.compile(r"^(.*/MatMul)(?:_Q\d+)?$")
_LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/(?:self_attn|attn|mlp)/(\w+)/MatMul$")
_MISMATCH = 0.3  # relative RMS difference above which a checkpoint tensor is not this node's weight


def requant_job(checkpoint, recipe: OnnxRecipe) -> dict[str, Any] | None:
    """What the child needs to re-quantize, or None when the recipe keeps the builder's codes."""
    if recipe.precision != "int4" or (recipe.weight_search == "builder" and not recipe.int8_matmuls
                                      and not recipe.int8_block_size):
        return None
    cfg = checkpoint.config.get("text_config") or checkpoint.config
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    qkv = [heads * head_dim, kv * head_dim, kv * head_dim] if heads and head_dim else None
    return {"weight_search": recipe.weight_search, "int8": list(recipe.int8_matmuls), "qkv_sizes": qkv,
            "int8_block_size": recipe.int8_block_size,
            "checkpoint": str(checkpoint.path), "config": checkpoint.config,
            "trust_remote_code": checkpoint.trust_remote_code}


def quantize_blocks(w, bits: int, block: int, importance=None):
    """Asymmetric blockwise quantization of w [N, K] along K, as MatMulNBits stores it.

    Returns (q uint8 [N, blocks, block], scale float32 [N, blocks], zero_point uint8 [N, blocks])
    with w ~ (q - zero_point) * scale. Each block keeps the candidate with the least weighted
    squared error measured after the zero point is rounded to an integer; weights are
    importance[k] * sqrt(mean(x^2) + x^2) with an imatrix, sqrt(mean(x^2)) + |x| without.
    """
    import numpy as np

    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    nb = -(-k // block)
    pad = nb * block - k
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    imp = None
    if importance is not None:
        imp = np.pad(np.asarray(importance, dtype=np.float32), (0, pad)).reshape(nb, block)
        imp = np.maximum(imp, 1e-12 * max(float(imp.max()), 1e-30))  # no column may weigh exactly 0
    x_all = w.reshape(n * nb, block)
    maxq = float(2 ** bits - 1)
    q_out = np.empty((n * nb, block), dtype=np.uint8)
    s_out = np.empty(n * nb, dtype=np.float32)
    z_out = np.empty(n * nb, dtype=np.uint8)
    rows_per_chunk = max(1, 65536 // nb) * nb  # whole rows, so importance tiles line up
    factors = [None] + [maxq - 1 + 0.1 * i for i in range(21)]
    for start in range(0, n * nb, rows_per_chunk):
        x = x_all[start:start + rows_per_chunk].astype(np.float64)
        sigma2 = (x * x).mean(1, keepdims=True)
        if imp is not None:
            wts = np.tile(imp, (len(x) // nb, 1)) * np.sqrt(sigma2 + x * x)
        else:
            wts = np.sqrt(sigma2) + np.abs(x)
        rmin, rmax = x.min(1, keepdims=True), x.max(1, keepdims=True)
        rng = np.where(rmax > rmin, rmax - rmin, 1.0)
        sw, sx = wts.sum(1, keepdims=True), (wts * x).sum(1, keepdims=True)
        best_err = np.full((len(x), 1), np.inf)
        best_s = np.ones((len(x), 1))
        best_z = np.zeros((len(x), 1))

        def consider(scale, mn):
            nonlocal best_err, best_s, best_z
            zp = np.clip(np.round(-mn / scale), 0, maxq)
            lq = np.clip(np.round(x / scale + zp), 0, maxq)
            err = (wts * ((lq - zp) * scale - x) ** 2).sum(1, keepdims=True)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, scale, best_s)
            best_z = np.where(better, zp, best_z)

        for factor in factors:
            iscale = (maxq if factor is None else factor) / rng
            if factor is None:  # plain min-max
                consider(1 / iscale, rmin)
                continue
            lv = np.clip(np.round(iscale * (x - rmin)), 0, maxq)
            wl = wts * lv
            sl, sl2, sxl = wl.sum(1, keepdims=True), (wl * lv).sum(1, keepdims=True), (wl * x).sum(1, keepdims=True)
            d = sw * sl2 - sl * sl
            ok = d > 0
            safe_d = np.where(ok, d, 1.0)
            scale = (sw * sxl - sx * sl) / safe_d
            mn = (sl2 * sx - sl * sxl) / safe_d
            ok &= scale > 0
            consider(np.where(ok, scale, 1 / iscale), np.where(ok, mn, rmin))
        # refit the scale with the chosen levels and zero point fixed
        lq = np.clip(np.round(x / best_s + best_z), 0, maxq) - best_z
        num, den = (wts * x * lq).sum(1, keepdims=True), (wts * lq * lq).sum(1, keepdims=True)
        refit = np.where((den > 0) & (num > 0), num / np.where(den > 0, den, 1.0), best_s)
        consider(refit, -best_z * refit)
        # constant blocks are exact: c = (maxq - 0) * c/maxq, or (0 - maxq) * (-c/maxq)
        flat = (rmax <= rmin)[:, 0]
        if flat.any():
            c = rmin[flat]
            best_s[flat] = np.where(c != 0, np.abs(c) / maxq, 1.0)
            best_z[flat] = np.where(c < 0, maxq, 0.0)
        scale32 = best_s.astype(np.float32)
        lq = np.clip(np.round(x / scale32 + best_z), 0, maxq)
        sl = slice(start, start + len(x))
        q_out[sl], s_out[sl], z_out[sl] = lq.astype(np.uint8), scale32[:, 0], best_z[:, 0].astype(np.uint8)
    return q_out.reshape(n, nb, block), s_out.reshape(n, nb), z_out.reshape(n, nb)


def pack_matmulnbits(q, scale, zp, bits: int):
    """(q [N, blocks, block], scale [N, blocks], zp [N, blocks]) -> the B, scales and
    zero_points arrays of MatMulNBits: 4-bit pairs low nibble first, zero points per row."""
    import numpy as np

    n, nb, block = q.shape
    if bits == 4:
        b = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
        zpp = np.zeros((n, (nb + 1) // 2), dtype=np.uint8)
        zpp[:, : (nb + 1) // 2] |= zp[:, 0::2]
        zpp[:, : nb // 2] |= zp[:, 1::2] << 4
    else:
        b, zpp = q.astype(np.uint8), zp.astype(np.uint8)
    return b, scale, zpp


def dequantize_matmulnbits(b, scales, zp, bits: int, block: int, n: int, k: int):
    """MatMulNBits initializers -> float weight [N, K] (the inverse of pack_matmulnbits)."""
    import numpy as np

    nb = -(-k // block)
    b = np.asarray(b).reshape(n, nb, block * bits // 8)
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, nb, -1) if bits == 4 else b
    scales = np.asarray(scales, dtype=np.float32).reshape(n, nb)
    if zp is None:
        z = np.full((n, nb), 2 ** (bits - 1), dtype=np.float32)
    elif bits == 4:
        zpp = np.asarray(zp).reshape(n, -1)
        z = np.stack([zpp & 0x0F, zpp >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float32)
    else:
        z = np.asarray(zp).reshape(n, nb).astype(np.float32)
    w = (q.astype(np.float32) - z[..., None]) * scales[..., None]
    return w.reshape(n, -1)[:, :k]


class CheckpointWeights:
    """Float weights [N, K] for builder node names, read from the checkpoint's safetensors."""

    def __init__(self, path: Path, qkv_sizes: Sequence[int] | None):
        from safetensors import safe_open

        self.qkv_sizes = list(qkv_sizes) if qkv_sizes else None
        self._files: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    self._files.setdefault(name, f)

    def _get(self, name: str):
        f = self._files.get(name)
        if f is None:
            return None
        if f not in self._open:
            from safetensors import safe_open

            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(name).float().numpy()

    def weight_for(self, base: str, n: int, k: int):
        import numpy as np

        def fits(t):
            return t if t is not None and t.shape == (n, k) else None

        if base.startswith("/lm_head/"):
            return fits(self._get("lm_head.weight")) if "lm_head.weight" in self._files else \
                fits(self._get("model.embed_tokens.weight"))
        m = _LAYER_NODE.match(base)
        if not m:
            return None
        pre, proj = f"model.layers.{m.group(1)}.", m.group(2)
        attn, mlp = pre + "self_attn.", pre + "mlp."
        if proj in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"):
            direct = fits(self._get(attn + proj + ".weight"))
            if direct is not None:
                return direct
            if proj == "qkv_proj":
                parts = [self._get(attn + p + ".weight") for p in ("q_proj", "k_proj", "v_proj")]
                return fits(np.concatenate(parts)) if all(p is not None for p in parts) else None
            fused = self._get(attn + "qkv_proj.weight")
            if fused is not None and self.qkv_sizes and proj != "o_proj":
                i = ("q_proj", "k_proj", "v_proj").index(proj)
                start = sum(self.qkv_sizes[:i])
                return fits(fused[start:start + self.qkv_sizes[i]])
            return fits(self._get(attn + "dense.weight")) if proj == "o_proj" else None
        if proj in ("gate_proj", "up_proj", "down_proj"):
            direct = fits(self._get(mlp + proj + ".weight"))
            if direct is not None or proj == "down_proj":
                return direct
            fused = self._get(mlp + "gate_up_proj.weight")  # [gate; up], as Phi-3 chunks it
            if fused is not None and fused.shape[0] == 2 * n:
                return fits(fused[:n] if proj == "gate_proj" else fused[n:])
        return None


class OnnxWeights:
    """Float weights [N, K] of the MatMuls of an fp32 ONNX graph (the optimum export)."""

    def __init__(self, path: Path):
        import onnx

        model = onnx.load(str(path))
        inits = {t.name: t for t in model.graph.initializer}
        self._by_node = {n.name: inits[n.input[1]] for n in model.graph.node
                         if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits}

    def weight_for(self, base: str, n: int, k: int):
        from onnx import numpy_helper

        t = self._by_node.get(base)
        if t is None:
            return None
        w = numpy_helper.to_array(t).astype("float32").T
        return w if w.shape == (n, k) else None


def _plan(base: str, n: int, bits: int, int8: Sequence[str], qkv_sizes: Sequence[int] | None) -> list[tuple[str, int, int, int]]:
    """Runs (label, first row, end row, bits) the node becomes; one run keeps it whole."""
    m = _LAYER_NODE.match(base)
    proj = m.group(2) if m else None
    if proj == "qkv_proj" and qkv_sizes and sum(qkv_sizes) == n and "qkv_proj" not in int8:
        widths = [8 if f"{p}_proj" in int8 else bits for p in "qkv"]
        runs: list[list] = []
        start = 0
        for p, size, w in zip("qkv", qkv_sizes, widths):
            if runs and runs[-1][3] == w:
                runs[-1][0] += p
                runs[-1][2] += size
            else:
                runs.append([p, start, start + size, w])
            start += size
        if len(runs) > 1:
            return [tuple(r) for r in runs]
        return [("", 0, n, runs[0][3])]
    if proj is not None and proj in int8:
        return [("", 0, n, 8)]
    return [("", 0, n, bits)]


def requantize(model_or_path, source, spec: dict[str, Any]) -> dict[str, Any]:
    """Re-quantize the MatMulNBits nodes of a graph (a ModelProto, changed in place, or a
    model.onnx path, rewritten with its model.onnx.data). Returns a report for the manifest."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = None
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        model = onnx.load(str(path))
    else:
        model = model_or_path
    graph = model.graph
    search = spec["weight_search"]
    int8, qkv_sizes = list(spec.get("int8", [])), spec.get("qkv_sizes")
    imatrix = None
    if search == "imatrix":
        from types import SimpleNamespace

        from ..imatrix import load_or_compute

        print(_PHASE + "imatrix: calibration text")
        ck = SimpleNamespace(path=Path(spec["checkpoint"]), config=spec["config"],
                             trust_remote_code=spec.get("trust_remote_code", False))
        imatrix = load_or_compute(ck)
    print(_PHASE + "re-quantizing weights (edgekit)")

    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    report: dict[str, Any] = {"weight_search": search, "int8_matmuls": int8, "requantized": 0,
                              "split": 0, "kept": [], "imatrix": imatrix.summary() if imatrix else None,
                              "imatrix_missing": []}
    new_nodes, drop, add = [], set(), []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
        base = _NODE_BASE.match(node.name).group(1) if _NODE_BASE.match(node.name) else node.name
        b_name, s_name = node.input[1], node.input[2]
        zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
        runs = _plan(base, n, bits, int8, qkv_sizes)
        int8_block = spec.get("int8_block_size") or block
        unchanged = len(runs) == 1 and runs[0][3] == bits and (bits != 8 or int8_block == block)
        if (search == "builder" and unchanged) or len(node.input) > 4:
            new_nodes.append(node)
            continue
        if any(uses.get(x, 0) > 1 for x in (b_name, s_name, zp_name) if x) or b_name not in inits:
            report["kept"].append(f"{node.name}: weights shared with another node (tied embedding)")
            new_nodes.append(node)
            continue
        w = source.weight_for(base, n, k)
        if w is None:
            report["kept"].append(f"{node.name}: no matching float weight")
            new_nodes.append(node)
            continue
        old = dequantize_matmulnbits(numpy_helper.to_array(inits[b_name]), numpy_helper.to_array(inits[s_name]),
                                     numpy_helper.to_array(inits[zp_name]) if zp_name else None, bits, block, n, k)
        rel = float(np.sqrt(np.mean((old - w) ** 2) / max(float(np.mean(w * w)), 1e-30)))
        if rel > _MISMATCH:
            report["kept"].append(f"{node.name}: checkpoint tensor does not match the node (rel. diff {rel:.2f})")
            new_nodes.append(node)
            continue
        importance = None
        if imatrix is not None:
            from ..imatrix import onnx_node_importance

            importance = onnx_node_importance(imatrix, node.name, k)
            if importance is None:
                report["imatrix_missing"].append(node.name)
        scale_type = inits[s_name].data_type
        prefix = b_name.rsplit("_Q", 1)[0] if "_Q" in b_name else b_name
        drop.update(x for x in (b_name, s_name, zp_name) if x)
        outputs = []
        for label, r0, r1, rbits in runs:
            rblock = int8_block if rbits == 8 else block
            q, scale, zp = quantize_blocks(w[r0:r1], rbits, rblock, importance)
            pb, ps, pz = pack_matmulnbits(q, scale, zp, rbits)
            tag = f".{label}" if label else ""
            names = (f"{prefix}{tag}_Q{rbits}G{rblock}", f"{prefix}{tag}_scale", f"{prefix}{tag}_zp")
            if len(runs) == 1 and rbits == bits and rblock == block:  # same node and names: only the codes change
                names = (b_name, s_name, zp_name or f"{prefix}_zp")
            ps = ps.astype(helper.tensor_dtype_to_np_dtype(scale_type))
            add += [numpy_helper.from_array(pb, names[0]), numpy_helper.from_array(ps, names[1]),
                    numpy_helper.from_array(pz, names[2])]
            out = node.output[0] if len(runs) == 1 else f"{node.output[0]}/{label}"
            outputs.append(out)
            new_nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], *names], [out],
                name=f"{base}_Q{rbits}" if len(runs) == 1 else f"{base}_{label}_Q{rbits}", domain="com.microsoft",
                **{**attrs, "N": r1 - r0, "bits": rbits, "block_size": rblock}))
        if len(runs) > 1:
            new_nodes.append(helper.make_node("Concat", outputs, [node.output[0]], name=f"{base}/Concat", axis=-1))
            report["split"] += 1
        report["requantized"] += 1
    kept_inits = [t for t in graph.initializer if t.name not in drop]
    graph.ClearField("initializer")
    graph.initializer.extend(kept_inits + add)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    if path is not None:
        _save_onnx(model, path)
    return report


def _requant_notes(report: dict[str, Any]) -> list[str]:
    notes = [f"edgekit re-quantized {report['requantized']} MatMuls (weight_search={report['weight_search']}"
             + (f", int8: {', '.join(report['int8_matmuls'])}" if report["int8_matmuls"] else "") + ")"]
    if report["split"]:
        notes.append(f"{report['split']} fused qkv MatMuls split by width and concatenated")
    if report["kept"]:
        notes.append(f"{len(report['kept'])} MatMuls kept the quantizer's codes ({report['kept'][0]})")
    if report.get("imatrix_missing"):
        notes.append(f"{len(report['imatrix_missing'])} MatMuls found no imatrix entry and were searched unweighted")
    return notes


# --- files the bundle needs beyond the model --------------------------------------------------

def longrope_switch(config: dict[str, Any]) -> int | None:
    """The original context where LongRoPE switches from its short to its long factors, or
    None: onnxruntime-genai leaves transformers' behaviour there (LONG_CONTEXT_LIMITS)."""
    cfg = config.get("text_config") or config
    scaling = cfg.get("rope_scaling") or {}
    original = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    if "short_factor" in scaling and "long_factor" in scaling and original \
            and (cfg.get("max_position_embeddings") or 0) > original:
        return int(original)
    return None


def set_context_length(config: dict[str, Any], genai_config: Path, wanted: int) -> tuple[int, str | None]:
    """Write the bundle's context (model.context_length and search.max_length, which
    onnxruntime-genai enforces) and return it with a note when it is not the model's own."""
    genai = json.loads(genai_config.read_text(encoding="utf-8"))
    model_context = int(genai["model"]["context_length"])
    switch = longrope_switch(config)
    note = None
    if wanted:
        context = wanted
        if switch and wanted > switch:
            note = (f"context_length {wanted} is past LongRoPE's switch at {switch} tokens, where onnxruntime-genai "
                    "0.15.2 keeps the short-factor KV cache and leaves transformers' behaviour")
    elif switch and switch < model_context:
        context = switch
        note = (f"context capped at {switch} tokens (of the model's {model_context}): past LongRoPE's switch "
                "onnxruntime-genai 0.15.2 keeps the short-factor KV cache and leaves transformers' behaviour; "
                "--set context_length=N lifts the cap")
    else:
        context = model_context
    if context != model_context:
        genai["model"]["context_length"] = context
        genai.setdefault("search", {})["max_length"] = context
        genai_config.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    return context, note


def _complete_bundle_files(checkpoint, staging: Path) -> list[str]:
    """Chat template in tokenizer_config.json and chat_template.jinja, generation_config.json.

    transformers 4.57 saves the template only as chat_template.jinja; onnxruntime-genai 0.15.2
    reads tokenizer_config.json's chat_template first and transformers prefers the .jinja
    file, so both must exist and agree or the two runtimes render different prompts.
    """
    notes = []
    for name in _TOKENIZER_EXTRAS:  # the builder re-saves the tokenizer; keep what it dropped
        if (checkpoint.path / name).is_file() and not (staging / name).exists():
            shutil.copy2(checkpoint.path / name, staging / name)
    tc_path = staging / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    template = _chat_template(staging) or _chat_template(checkpoint.path)
    if template is None:
        notes.append("the checkpoint has no chat template: use raw prompts with this bundle")
    else:
        tc["chat_template"] = template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if isinstance(template, str):
            (staging / "chat_template.jinja").write_text(template, encoding="utf-8")
    gen = staging / "generation_config.json"
    if not gen.exists():
        if (checkpoint.path / "generation_config.json").is_file():
            shutil.copy2(checkpoint.path / "generation_config.json", gen)
        else:
            keys = ("bos_token_id", "eos_token_id", "pad_token_id")
            gen.write_text(json.dumps({k: checkpoint.config.get(k) for k in keys}, indent=2) + "\n")
    return notes


def _chat_template(directory: Path) -> str | list | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        return json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
    return None


def _write_genai_config(checkpoint, staging: Path) -> None:
    """genai_config.json for an optimum graph: names and shapes read from the graph itself."""
    import onnx

    graph = onnx.load(str(staging / "model.onnx"), load_external_data=False).graph
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    past_keys = sorted(n for n in shapes if re.fullmatch(r"past_key_values\.\d+\.key", n))
    if not past_keys or any(len(shapes[k]) != 4 or not isinstance(shapes[k][1], int) for k in past_keys):
        raise ToolFailed("the exported graph's KV cache is not [batch, heads, seq, head_dim] per layer",
                         "onnxruntime-genai cannot drive it; use the gguf-q4_k_m target")
    cfg = checkpoint.config.get("text_config") or checkpoint.config
    gen_path = checkpoint.path / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    wanted = ("input_ids", "attention_mask", "position_ids")
    inputs = {n: n for n in wanted if n in shapes}
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    model_type = cfg.get("model_type", "")
    config = {
        "model": {
            "type": model_type if model_type in _GENAI_DECODER_TYPES else "llama",
            "bos_token_id": gen.get("bos_token_id", cfg.get("bos_token_id", 1)),
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "vocab_size": cfg["vocab_size"],
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": shapes[past_keys[0]][3],
                "hidden_size": cfg.get("hidden_size") or cfg.get("n_embd"),
                "num_attention_heads": cfg.get("num_attention_heads") or cfg.get("n_head"),
                "num_key_value_heads": shapes[past_keys[0]][1],
                "num_hidden_layers": len(past_keys),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        # optimum's graph concatenates past and new keys, so the cache cannot share a buffer.
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }
    (staging / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def weight_summary(model_path: Path) -> dict[str, Any]:
    """What precision the weights ended in, read from the graph (not from the request)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    summary: dict[str, Any] = {"matmul_int4": 0, "matmul_int8": 0, "matmul_float": [], "embedding": "none"}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            summary[f"matmul_int{bits}"] = summary.get(f"matmul_int{bits}", 0) + 1
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            summary["matmul_float"].append(node.name)
        elif node.op_type == "GatherBlockQuantized":
            # a tied embedding reads the lm_head's codes: int8 when the lm_head is int8
            summary["embedding"] = f"int{next((a.i for a in node.attribute if a.name == 'bits'), 4)}"
        elif node.op_type == "Gather" and node.input[0] in inits and "embed" in node.name:
            summary["embedding"] = "float"
    return summary


def _weight_notes(weights: dict[str, Any]) -> list[str]:
    notes = []
    if weights["matmul_int8"]:
        notes.append(f"{weights['matmul_int8']} of {weights['matmul_int4'] + weights['matmul_int8']} "
                     "quantized MatMuls are int8 (recipe)")
    if weights["matmul_float"]:
        names = ", ".join(weights["matmul_float"][:3])
        notes.append(f"{len(weights['matmul_float'])} MatMul weights stay float ({names})")
    if weights["embedding"] == "float":
        notes.append("token embedding stays float")
    return notes


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------

def open_session(bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None) -> "OnnxSession":
    import onnxruntime_genai as og

    config = og.Config(str(bundle_dir))
    if threads:
        session_options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
    try:
        model = og.Model(config)
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises plain RuntimeError
        raise ToolFailed(f"onnxruntime-genai cannot load {bundle_dir} ({e})", "Re-export the bundle") from None
    genai = json.loads((Path(bundle_dir) / "genai_config.json").read_text(encoding="utf-8"))
    return OnnxSession(og, model, genai["model"]["context_length"])


class OnnxSession:
    """A bundle open in onnxruntime-genai, used the way a plain onnxruntime-genai user would."""

    def __init__(self, og, model, context_length: int):
        self._og = og
        self._model = model
        self._tokenizer = og.Tokenizer(model)
        self._eos = {int(t) for t in self._tokenizer.eos_token_ids}
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        # onnxruntime-genai's encode parses special tokens and adds no BOS (checked against
        # transformers: it equals tokenizer.encode(text, add_special_tokens=False)).
        return [int(t) for t in self._tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        import numpy as np

        return self._tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def chat_prompt_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # onnxruntime-genai 0.15.2 renders the template from the bundle's tokenizer_config.json
        # itself; its output is then tokenized like any text (no BOS added unless the
        # template writes one), which is what transformers' apply_chat_template does too.
        try:
            text = self._tokenizer.apply_chat_template(json.dumps(messages),
                                                       add_generation_prompt=add_generation_prompt)
        except RuntimeError as e:
            raise BadInput(f"onnxruntime-genai cannot render the bundle's chat template ({e})",
                           "Use a raw prompt, or export a checkpoint that has a chat template") from None
        return self.encode(text)

    def generate(self, prompt_ids: Sequence[int], max_tokens: int,
                 on_text: Callable[[str], None] | None = None, ignore_eos: bool = False) -> Generation:
        """Greedy. The EOS token that ends a generation is not part of token_ids or text.

        `text` is what the runtime's TokenizerStream streamed (and on_text received). It differs
        from transformers' decode only where byte-fallback tokens do not form valid UTF-8:
        the stream drops them (transformers shows U+FFFD), and og.Tokenizer.decode even cuts
        the whole string at the first one, so it is not used here.
        """
        import numpy as np

        og = self._og
        if not prompt_ids:
            raise BadInput("the prompt has no tokens", "Pass a non-empty prompt")
        length = len(prompt_ids) + max_tokens
        if length > self.context_length:
            raise BadInput(f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) exceeds the "
                           f"context length {self.context_length}", "Ask for fewer tokens")
        params = og.GeneratorParams(self._model)
        # Greedy whatever generation_config.json asked for; min_length = max_length masks the
        # EOS logits until the end, which is how ignore_eos is expressed in onnxruntime-genai.
        params.set_search_options(do_sample=False, num_beams=1, repetition_penalty=1.0, max_length=length,
                                  min_length=length if ignore_eos else 0)
        generator = og.Generator(self._model, params)
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        stream = self._tokenizer.create_stream()
        out: list[int] = []
        pieces: list[str] = []
        stopped_by = "max_tokens"
        while len(out) < max_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self._eos and not ignore_eos:
                stopped_by = "eos"
                break
            out.append(token)
            piece = stream.decode(token)
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)
            if generator.is_done():
                break
        del generator
        return Generation(token_ids=tuple(out), text="".join(pieces),
                          prompt_tokens=len(prompt_ids), stopped_by=stopped_by)

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        """Teacher-forced logits [len(ids), vocab] from one prefill: onnxruntime-genai returns
        the graph's logits for every appended position (its vocabulary may be padded)."""
        import numpy as np

        if len(ids) > self.context_length:
            raise BadInput(f"{len(ids)} tokens exceed the context length {self.context_length}",
                           "Use a shorter evaluation window")
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = self._og.Generator(self._model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
        del generator
        return logits.reshape(-1, logits.shape[-1])[-len(ids):]

    def stepwise_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int]) -> "np.ndarray":
        """Logits the way an application meets them: append_tokens(prompt), then one token at
        a time. Rows: the prompt's last position, then one per continuation token but the last.
        Stops early (fewer rows) at the bundle's context length, which the runtime enforces."""
        import numpy as np

        total = min(len(prompt_ids) + len(continuation), self.context_length)
        rows = max(0, min(len(continuation), total - len(prompt_ids) + 1))
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=total)
        generator = self._og.Generator(self._model, params)
        out: list[np.ndarray] = []
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        for i in range(rows):
            if i:
                generator.append_tokens(np.asarray([continuation[i - 1]], dtype=np.int32))
            last = np.asarray(generator.get_logits(), dtype=np.float32)
            out.append(last.reshape(-1, last.shape[-1])[-1])
        del generator
        return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)

    def close(self) -> None:
        self._tokenizer = self._model = None

    def timed_generate(self, prompt_ids: Sequence[int], gen_tokens: int,
                       probe: Callable[[str], None] | None = None,
                       max_length: int | None = None) -> tuple[float, float, float, int]:
        """One greedy generation of exactly `gen_tokens` tokens: min_length = max_length masks
        EOS, so the length is forced. Returns (prefill_s, first_token_s, decode_s, n_generated).

        max_length (default prompt + gen_tokens) is what the generator allocates its KV cache
        for; a benchmark passes its context so the cache matches llama.cpp's n_ctx.

        prefill_s times append_tokens(prompt), one forward pass over the prompt. The first
        generate_next_token() only selects from the prefill logits: first_token_s (time to first
        token) adds it. Each later one runs the previous token forward and selects the next;
        decode_s covers those n_generated - 1 calls. Greedy selection happens inside
        generate_next_token (C++), so unlike llama.cpp's argmax it is inside the timing.
        Building the generator (KV cache allocation) and probe("prefill") / probe("decode")
        run outside the timed regions.
        """
        import numpy as np

        prompt = np.asarray(prompt_ids, dtype=np.int32)
        if not len(prompt) or gen_tokens < 1:
            raise BadInput("a timed generation needs a prompt and at least one new token", "Fix the benchmark settings")
        needed = len(prompt) + gen_tokens
        length = max_length or needed
        if needed > length or length > self.context_length:
            raise BadInput(f"{len(prompt)} prompt tokens + {gen_tokens} new tokens exceed the context length "
                           f"{min(length, self.context_length)}", "Lower --prompt-tokens or --gen-tokens")
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(do_sample=False, num_beams=1, repetition_penalty=1.0,
                                  max_length=length, min_length=length)
        generator = self._og.Generator(self._model, params)
        clock = time.perf_counter
        t0 = clock()
        generator.append_tokens(prompt)
        prefill_s = clock() - t0
        if probe:
            probe("prefill")
        t0 = clock()
        generator.generate_next_token()
        first_token_s = prefill_s + (clock() - t0)
        n = 1
        t0 = clock()
        while n < gen_tokens:
            generator.generate_next_token()
            n += 1
        decode_s = clock() - t0
        if probe:
            probe("decode")
        del generator
        return prefill_s, first_token_s, decode_s, n


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------

def tool_versions() -> dict[str, str]:
    """Versions that shape an onnx-int4 bundle (the optimum ones are added by export when used)."""
    return _versions("onnxruntime", "onnxruntime-genai", "onnx", "onnx-ir", "transformers", "torch")


def _versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for p in packages:
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            pass
    return found
