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

from ..errors import BadInput, ToolFailed, UnsupportedArchitecture
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


def parse_recipe(table: dict[str, Any], where: str) -> OnnxRecipe:
    from ..targets import dataclass_from_table

    recipe = dataclass_from_table(OnnxRecipe, table, where)
    checks = (
        ("engine", ENGINES), ("precision", PRECISIONS), ("block_size", BLOCK_SIZES), ("accuracy_level", ACCURACY_LEVELS),
        ("algorithm", tuple(ALGORITHMS)), ("embeddings", EMBEDDINGS),
    )
    for key, allowed in checks:
        value = getattr(recipe, key)
        # bool is an int to Python; `block_size = true` must not pass as 1.
        if value not in allowed or isinstance(value, bool):
            raise BadInput(f"{where}: {key} = {value!r} is not allowed",
                           f"Use one of: {', '.join(str(a) for a in allowed)}")
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
    work = staging.parent / (staging.name + "-onnx-work")  # same disk; stale ones are swept by pid
    work.mkdir()
    try:
        if engine == "builder":
            try:
                _run_builder(checkpoint, staging, work, recipe, progress)
            except _Unsupported as e:
                if recipe.engine == "builder" or checkpoint.architecture not in FALLBACK_ARCHITECTURES:
                    raise UnsupportedArchitecture(
                        f"the onnxruntime-genai builder cannot export {checkpoint.architecture}: {e}",
                        "Try --set engine=optimum, or the gguf-q4_k_m target") from None
                notes.append(f"the genai builder refused this checkpoint ({e}); used the optimum fallback")
                _clear(staging)
                engine = "optimum"
        if engine == "optimum":
            _run_optimum(checkpoint, staging, work, recipe, progress)
            _write_genai_config(checkpoint, staging)
            notes.append("exported with optimum + MatMulNBitsQuantizer (fallback path); "
                         "genai_config.json written by edgekit")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    notes += _complete_bundle_files(checkpoint, staging)
    weights = weight_summary(staging / "model.onnx")
    notes += _weight_notes(weights)
    if recipe.precision == "int4" and ALGORITHMS[recipe.algorithm][1] and not weights["matmul_int8"]:
        notes.append(f"algorithm {recipe.algorithm} raises some MatMuls to int8, but none matched "
                     "in this graph: every quantized MatMul is int4")
    path_taken = "genai-builder" if engine == "builder" else "optimum+MatMulNBits"
    quantization = {"path": path_taken, "weights": weights}
    if engine == "builder":
        quantization["builder_extra_options"] = builder_extra_options(recipe, checkpoint.trust_remote_code)
    tools = tool_versions()
    if engine == "optimum":
        tools.update(_versions("optimum", "optimum-onnx"))
    return ExportNotes(
        quantization=quantization, tools=tools, path_taken=path_taken, notes=tuple(notes),
        reproducible_files=tuple(sorted(p.name for p in staging.iterdir() if p.is_file())),
    )


def choose_engine(checkpoint, recipe: OnnxRecipe) -> str:
    arch = checkpoint.architecture
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


def _run_builder(checkpoint, staging: Path, work: Path, recipe: OnnxRecipe, progress) -> None:
    job = {
        "engine": "builder",
        "input": str(checkpoint.path),
        "output": str(staging),
        "cache_dir": str(work / "cache"),
        "extra_options": builder_extra_options(recipe, checkpoint.trust_remote_code),
        "precision": recipe.precision,
    }
    result = _run_child(job, work, progress, _ChildOutput(_num_layers(checkpoint.config)))
    if result.get("error") == "NotImplementedError":
        raise _Unsupported(result.get("message", ""))
    _raise_on_failure(result, "the onnxruntime-genai model builder")


def _run_optimum(checkpoint, staging: Path, work: Path, recipe: OnnxRecipe, progress) -> None:
    job = {
        "engine": "optimum",
        "input": str(checkpoint.path),
        "output": str(staging),
        "cache_dir": str(work / "cache"),
        "fp32_dir": str(work / "fp32"),
        "trust_remote_code": checkpoint.trust_remote_code,
        "recipe": {k: getattr(recipe, k) for k in OnnxRecipe.__dataclass_fields__},
    }
    result = _run_child(job, work, progress, _ChildOutput(_num_layers(checkpoint.config)))
    _raise_on_failure(result, "optimum's ONNX export + MatMulNBitsQuantizer")


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
        steps.close()
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
        {"builder": _child_builder, "optimum": _child_optimum}[job["engine"]](job)
        result = {"ok": True}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises ToolFailed
        traceback.print_exc(file=sys.stdout)
        result = {"ok": False, "error": type(e).__name__, "message": str(e)[:2000]}
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


def _child_builder(job: dict[str, Any]) -> None:
    from onnxruntime_genai.models.builder import check_extra_options, create_model

    opts = dict(job["extra_options"])
    # check_extra_options converts the strings to typed values and loads the HF config into
    # opts["hf_details"], which create_model requires: the same two calls the CLI makes.
    precision = job.get("precision", "int4")
    check_extra_options(None, job["input"], job["output"], precision, "cpu", job["cache_dir"], opts)
    create_model(None, job["input"], job["output"], precision, "cpu", job["cache_dir"], **opts)


def _child_optimum(job: dict[str, Any]) -> None:
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
    print(_PHASE + "writing model.onnx")
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    os.chmod(out / "model.onnx.data", 0o644)  # onnx writes it 0600, unlike every other bundle file
    # optimum copies tokenizer, chat template and generation config beside its model.onnx.
    for p in fp32.iterdir():
        if p.is_file() and not p.name.startswith("model.onnx") and p.name != "config.json":
            shutil.copy2(p, out / p.name)


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


# --- files the bundle needs beyond the model --------------------------------------------------

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
            summary["embedding"] = "int4"
        elif node.op_type == "Gather" and node.input[0] in inits and "embed" in node.name:
            summary["embedding"] = "float"
    return summary


def _weight_notes(weights: dict[str, Any]) -> list[str]:
    notes = []
    if weights["matmul_int8"]:
        notes.append(f"{weights['matmul_int8']} of {weights['matmul_int4'] + weights['matmul_int8']} "
                     "quantized MatMuls are int8 (recipe algorithm)")
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
