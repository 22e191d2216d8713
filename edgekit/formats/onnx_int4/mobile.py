"""Phone bundles (recipe key `mobile`): the exported model in ONNX Runtime's ORT format, the
operator list for an ORT reduced build, and ONNX Runtime's own mobile usability verdict.

The ORT format (FlatBuffers) is what ONNX Runtime's mobile and reduced builds load without
protobuf, and it is the only format a reduced build reads at all. It has no external data:
weights live inside the one file, whose 32-bit offsets cap it below 2 GiB. The conversion is
ONNX Runtime's own (an InferenceSession that saves its optimized graph in ORT format, as
onnxruntime.tools.convert_onnx_models_to_ort does), then its output is checked twice before
the .onnx goes: same logits as the .onnx in onnxruntime, and onnxruntime-genai loads and
generates from it. A model that fails either check keeps its .onnx and the notes say why.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .benching import kv_cache_element_bytes

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from ...progress import Progress

ORT_MODEL = "model.ort"
OPERATORS_CONFIG = "required_operators.config"
# FlatBuffers addresses a buffer with signed 32-bit offsets: an ORT-format file must stay under
# 2 GiB, and it cannot keep weights outside (no external data, unlike model.onnx.data).
ORT_FORMAT_LIMIT = 2**31 - 1
# ORT_ENABLE_EXTENDED, fixed so that a rebuild writes the same graph: every rewrite at this
# level (contrib-op fusions such as QuickGelu) runs on the CPU EP of any platform. The level
# above adds layout transformers, which are device-specific (NCHWc needs x86 AVX; the convert
# tool switches it off for ARM) and have nothing to rewrite in a decoder without Conv.
OPTIMIZATION_LEVEL = "extended"
# Constant folding is left out: the builder writes its constants folded already, and for a tied
# embedding (GatherBlockQuantized reading lm_head's codes through a Reshape) folding stores a
# second copy of those codes. Measured on SmolLM2-135M: model.ort 145.6 MiB with it, 118.6
# without (the .onnx files: 118.4), the same fusions otherwise (benchmarks/mobile.py --folding).
DISABLED_OPTIMIZERS = ("ConstantFolding",)
# Prompt tokens fed to the .onnx and the .ort for the logits check, and the largest difference
# accepted: the same kernels run on the same weights, so only the fusions the optimizer made
# can change a float; measured differences on tiny models are ~1e-6 (tests/test_mobile.py).
CHECK_TOKENS = 8
MAX_LOGIT_DIFF = 1e-3
# Generated tokens onnxruntime-genai must produce from the ORT-format bundle.
GENAI_CHECK_TOKENS = 4


@dataclass(frozen=True)
class MobileResult:
    """What the mobile step adds to the manifest and which files it wrote."""

    quantization: dict[str, Any]  # merged into manifest["quantization"]
    notes: tuple[str, ...]
    unreproducible: tuple[str, ...] = ()  # files a rebuild does not write byte for byte


def make_mobile(staging: Path, progress: Progress) -> MobileResult:
    """Replace model.onnx + model.onnx.data by model.ort where it fits and checks out."""
    onnx_file, data_file = staging / "model.onnx", staging / "model.onnx.data"
    with progress.step("checking mobile usability"):
        usability = usability_verdict(onnx_file)
    quantization: dict[str, Any] = {"mobile_usability": usability, "model_file": onnx_file.name}
    notes = [usability_note(usability)]
    size = onnx_file.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0)
    if size > ORT_FORMAT_LIMIT:
        quantization["ort_format"] = {"converted": False, "onnx_bytes": size}
        notes.append(
            f"model.onnx + model.onnx.data are {size / 2**30:.2f} GiB, over the ORT format's 2 GiB cap: "
            "kept model.onnx (the mobile packages load it too, with protobuf)"
        )
        return MobileResult(quantization, tuple(notes))

    ort_file = staging / ORT_MODEL
    record: dict[str, Any] = {
        "converted": False,
        "kv_element_bytes": kv_cache_element_bytes(staging),  # bench reads it here once model.onnx is gone
        "optimization_level": OPTIMIZATION_LEVEL,
        "disabled_optimizers": list(DISABLED_OPTIMIZERS),
        "onnx_bytes": size,
        "check_tokens": CHECK_TOKENS,
    }
    failure = None
    try:
        with progress.step("converting to ORT format"):
            convert_to_ort(onnx_file, ort_file)
            write_operators_config(ort_file, staging / OPERATORS_CONFIG)
        record["ort_bytes"] = ort_file.stat().st_size
        with progress.step("checking model.ort against model.onnx"):
            record["max_abs_logit_diff"] = max_logit_diff(onnx_file, ort_file, CHECK_TOKENS)
            if record["max_abs_logit_diff"] > MAX_LOGIT_DIFF:
                failure = (
                    f"its logits differ from model.onnx's by {record['max_abs_logit_diff']:.3g} (> {MAX_LOGIT_DIFF})"
                )
            else:
                failure = genai_failure(staging)
                record["genai_generates"] = failure is None
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        # A graph ONNX Runtime cannot convert or run in ORT format is still a working .onnx bundle.
        failure = f"ONNX Runtime could not convert or run it ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    if failure:
        _use_decoder_file(staging, onnx_file.name)
        ort_file.unlink(missing_ok=True)
        (staging / OPERATORS_CONFIG).unlink(missing_ok=True)
        quantization["ort_format"] = record
        notes.append(f"model.ort was not kept: {failure}; the bundle ships model.onnx")
        return MobileResult(quantization, tuple(notes))
    record["converted"] = True
    onnx_file.unlink()
    data_file.unlink(missing_ok=True)
    quantization.update(ort_format=record, model_file=ORT_MODEL)
    notes.append(
        f"ORT format: model.ort {record['ort_bytes'] / 2**20:.1f} MiB (from {size / 2**20:.1f} MiB of .onnx + .onnx.data), "
        f"max |logit difference| to model.onnx {record['max_abs_logit_diff']:.2g} over {CHECK_TOKENS} tokens"
    )
    # Not byte-reproducible: ONNX Runtime 1.32.0 writes different bytes on every conversion of
    # the same .onnx, even with optimizations off and within one process, while the graph,
    # initializers and kernel-type table read back in the same order (measured on tiny Phi-3).
    # A rebuild's model.ort gives the same logits instead (tests/test_mobile.py).
    return MobileResult(quantization, tuple(notes), unreproducible=(ORT_MODEL,))


# --- ORT format --------------------------------------------------------------------------------


def convert_to_ort(onnx_file: Path, ort_file: Path) -> None:
    """ONNX Runtime optimizes the graph at OPTIMIZATION_LEVEL (less DISABLED_OPTIMIZERS) and saves
    it in ORT format, weights inside, as onnxruntime.tools.convert_onnx_models_to_ort does for its
    "Fixed" style."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(ort_file)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3  # errors only: its warnings would land on our stderr
    session = ort.InferenceSession(
        str(onnx_file),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )
    del session


def write_operators_config(ort_file: Path, config: Path) -> None:
    """The operators (by domain and opset) an ORT reduced build must include to run ort_file,
    as convert_onnx_models_to_ort writes it; its header names the model by file name only, not
    by the staging path it was read from."""
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)  # importing it calls logging.basicConfig, a no-op while root has a handler
    try:
        from onnxruntime.tools.ort_format_model import create_config_from_models
    finally:
        root.removeHandler(guard)
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # not "Created config in <path>"
    create_config_from_models([ort_file], config, enable_type_reduction=False)
    lines = config.read_text(encoding="utf-8").splitlines()
    lines = [f"# - {ort_file.name}" if line.startswith("# - ") else line for line in lines]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")


def feeds_for(session: Any, ids: list[int], head_size: int) -> dict[str, np.ndarray]:
    """Inputs for one prefill of `ids` from an empty KV cache, read from the graph's inputs (the
    builder leaves the cache's head dimension symbolic; genai_config.json has it)."""
    import numpy as np

    n = len(ids)
    feeds: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        int_type = np.int32 if "int32" in i.type else np.int64
        if i.name == "input_ids":
            feeds[i.name] = np.asarray([ids], dtype=int_type)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, n), dtype=int_type)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(n, dtype=int_type)[None]
        elif i.name.startswith("past_key_values"):
            # [batch, kv_heads, past_length, head_size]: an empty cache has past_length 0
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = np.zeros((1, int(i.shape[1]), 0, head_size), dtype=dtype)
        else:
            raise ValueError(f"unexpected graph input {i.name}")
    return feeds


def max_logit_diff(onnx_file: Path, ort_file: Path, tokens: int) -> float:
    """Largest |difference| between the two files' logits over one prefill of `tokens` tokens,
    each run in a plain onnxruntime session (default optimizations, as an application gets)."""
    import numpy as np
    import onnxruntime as ort

    ids = [(7 * i + 3) % 100 + 1 for i in range(tokens)]  # fixed, low ids any vocabulary has
    genai = json.loads((onnx_file.parent / "genai_config.json").read_text(encoding="utf-8"))
    head_size = int(genai["model"]["decoder"]["head_size"])
    outputs = []
    for path in (onnx_file, ort_file):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        outputs.append(np.asarray(session.run(["logits"], feeds_for(session, ids, head_size))[0], dtype=np.float32))
        del session
    return float(np.max(np.abs(outputs[0] - outputs[1])))


def genai_failure(staging: Path) -> str | None:
    """Point genai_config.json at model.ort and generate a few tokens with onnxruntime-genai;
    None when it does, else what went wrong (genai_config.json is left pointing at model.ort)."""
    import numpy as np
    import onnxruntime_genai as og

    _use_decoder_file(staging, ORT_MODEL)
    try:
        model = og.Model(str(staging))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=1 + GENAI_CHECK_TOKENS, min_length=1 + GENAI_CHECK_TOKENS)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([1], dtype=np.int32))
        produced = 0
        while not generator.is_done():
            generator.generate_next_token()
            produced += 1
        del generator, model
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises plain RuntimeError
        return f"onnxruntime-genai cannot run it ({str(e).splitlines()[0][:160]})"
    if produced != GENAI_CHECK_TOKENS:
        return f"onnxruntime-genai produced {produced} of {GENAI_CHECK_TOKENS} tokens from it"
    return None


def _use_decoder_file(staging: Path, name: str) -> None:
    path = staging / "genai_config.json"
    genai = json.loads(path.read_text(encoding="utf-8"))
    genai["model"]["decoder"]["filename"] = name
    path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")


# --- usability ---------------------------------------------------------------------------------


class _Lines(logging.Handler):
    """Keeps what ONNX Runtime's checker logs, for the manifest, instead of printing it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += [" ".join(line.split()) for line in record.getMessage().splitlines() if line.strip()]


def usability_verdict(onnx_file: Path) -> dict[str, Any]:
    """ONNX Runtime's mobile usability check (onnxruntime.tools.check_onnx_model_mobile_usability)
    run the way its checker() runs it, but on the graph alone: the weights stay on disk (protobuf
    cannot hold past 2 GiB, and the check reads only op types and shapes). The tool would first
    let ONNX Runtime fold constants (which needs the weights); the op types it judges are the
    same. Per EP: the partitions the graph splits into, the nodes they take, the ops they cannot
    and the checker's suitability (as exported, and with the dynamic shapes fixed, the better of
    the two as it reports); "recommended" lists the execution providers worth trying, CPU last."""
    import onnx
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    model = onnx.load(str(onnx_file), load_external_data=False)
    # An initializer's own dims are its shape. edgekit's int8 re-quantization changes some scale
    # and zero-point initializers' block counts but leaves the builder's value_info for them, and
    # onnx's shape inference refuses the contradiction; those entries say nothing the dims do not.
    initializers = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in initializers]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    shaped = onnx.shape_inference.infer_shapes(model)
    dynamic_inputs, _ = uc.check_shapes(shaped.graph)
    handler = _Lines()
    logger = logging.getLogger("edgekit.mobile_usability")
    logger.propagate = False  # nothing reaches the root logger's stderr
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    # The execution providers the checker judges (its checker() function), each against the
    # supported-ops table shipped beside it.
    checks = {
        "NNAPI": lambda fixed: uc.check_nnapi_partitions(shaped, fixed),  # Android
        "CoreML NeuralNetwork": lambda fixed: uc.check_coreml_partitions(
            shaped, fixed, "coreml_supported_neuralnetwork_ops.md"
        ),  # iOS, the older CoreML model type
        "CoreML MLProgram": lambda fixed: uc.check_coreml_partitions(
            shaped, fixed, "coreml_supported_mlprogram_ops.md"
        ),
    }
    verdict: dict[str, Any] = {"checker": "onnxruntime.tools.mobile_helpers.usability_checker", "eps": {}}
    try:
        for ep, check in checks.items():
            as_is = check(True)  # nodes with a dynamically shaped input do not count, as exported
            as_is.print_analysis(logger, ep)
            entry = {
                "suitability": as_is.suitability().name,
                "partitions": as_is.num_partitions,
                "supported_nodes": as_is.num_supported_nodes,
                "nodes": as_is.num_nodes,
                "unsupported_ops": sorted(as_is.unsupported_ops),
            }
            if as_is.suitability() != uc.PartitioningInfo.TryWithEP.YES and dynamic_inputs:
                # the checker's second look: what fixing every input shape would give
                fixed = check(False)
                fixed.print_analysis(logger, f"{ep} (shapes fixed)")
                entry["fixed_shapes"] = {
                    "suitability": fixed.suitability().name,
                    "partitions": fixed.num_partitions,
                    "supported_nodes": fixed.num_supported_nodes,
                }
                if fixed.suitability() > as_is.suitability():
                    entry["suitability"] = fixed.suitability().name  # the checker reports the better one
            verdict["eps"][ep] = entry
    finally:
        logger.removeHandler(handler)
    verdict["contrib_ops"] = _contrib_ops(model)
    worth = [ep for ep, v in verdict["eps"].items() if v["suitability"] != "NO"]
    verdict["recommended"] = [*worth, "CPU"]
    verdict["log"] = handler.lines
    return verdict


def _contrib_ops(model: onnx.ModelProto) -> list[str]:
    """ONNX Runtime's own ops (com.microsoft: MatMulNBits, GroupQueryAttention, ...), which only
    ONNX Runtime's CPU EP (and some desktop GPU EPs) implement: no NNAPI or CoreML partition takes them."""
    return sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})


def usability_note(verdict: dict[str, Any]) -> str:
    eps = "; ".join(
        f"{ep} {v['partitions']} partitions over {v['supported_nodes']}/{v['nodes']} nodes ({v['suitability']})"
        for ep, v in verdict["eps"].items()
    )
    contrib = f"; {', '.join(verdict['contrib_ops'])} run on the CPU EP" if verdict["contrib_ops"] else ""
    return f"mobile usability (ONNX Runtime's checker): use {' or '.join(verdict['recommended'])}; {eps}{contrib}"
