"""What edgekit bench needs from an onnx-int4 bundle (edgekit.formats.FormatBackend's bench_*)."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import BenchRuntime, BenchSetup
from .session import OnnxSession, open_session

if TYPE_CHECKING:
    from ...targets import Profile

# onnx TensorProto element type -> bytes, for the past_key inputs the graphs declare.
_ONNX_ELEM_BYTES = {
    1: 4,  # FLOAT: what the builder writes for the CPU EP
    10: 2,  # FLOAT16: GPU exports
    16: 2,  # BFLOAT16
    11: 8,  # DOUBLE
}


def kv_cache_element_bytes(bundle: Path) -> int | None:
    """Element size of the graph's past key input (the builder uses fp32 on CPU, fp16 on GPU)."""
    try:
        import onnx

        graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - onnx missing or an unreadable graph: the caller notes it
        return None
    for inp in graph.input:
        if inp.name.startswith("past_key"):
            return _ONNX_ELEM_BYTES.get(inp.type.tensor_type.elem_type)
    return None


def bench_setup(bundle: Path, manifest: dict[str, Any], profile: Profile) -> BenchSetup:
    """genai_config.json's context caps the run; accuracy_level is fixed in the graph at export;
    profiles run ONNX on the CPU, so no layer is offloaded."""
    context = None
    try:
        genai = json.loads((bundle / "genai_config.json").read_text(encoding="utf-8"))
        context = int(genai["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    accuracy = manifest.get("quantization", {}).get("accuracy_level")
    subs = []
    if profile.accuracy_level is not None and accuracy != profile.accuracy_level:
        subs.append(
            f"accuracy_level: the profile asks for {profile.accuracy_level}; the bundle's MatMulNBits "
            f"nodes carry {accuracy}, fixed at export, so it ran with {accuracy} (re-export with "
            f"--set accuracy_level={profile.accuracy_level})"
        )
    return BenchSetup(
        context_limit=context,
        # a phone bundle has no model.onnx to read; its export recorded the size before converting
        kv_element_bytes=kv_cache_element_bytes(bundle)
        or manifest.get("quantization", {}).get("ort_format", {}).get("kv_element_bytes"),
        gpu_layers=0,
        accuracy_level=accuracy,
        substitutions=tuple(subs),
    )


def bench_runtime(bundle: Path, manifest: dict[str, Any], context: int, gpu_layers: int) -> BenchRuntime:
    import onnxruntime_genai as og

    try:
        ort = version("onnxruntime")
    except PackageNotFoundError:
        ort = "not installed"
    return BenchRuntime(
        versions={"onnxruntime-genai": og.__version__, "onnxruntime": ort}, gpu_layers=gpu_layers, substitutions=()
    )


def bench_session(bundle: Path, manifest: dict[str, Any], threads: int, context: int, gpu_layers: int) -> OnnxSession:
    return open_session(bundle, manifest, threads=threads)
