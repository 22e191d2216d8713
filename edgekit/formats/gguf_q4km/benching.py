"""What edgekit bench needs from a gguf-q4_k_m bundle (edgekit.formats.FormatBackend's bench_*)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import BenchRuntime, BenchSetup
from .recipe import MODEL_FILE
from .session import LlamaCppSession, longrope_context_note

if TYPE_CHECKING:
    from ...targets import Profile

# llama.cpp keeps its K/V cache in f16 unless told otherwise (edgekit's session does not).
KV_ELEMENT_BYTES = 2


def bench_setup(bundle: Path, manifest: dict[str, Any], profile: Profile) -> BenchSetup:
    """The model config alone bounds the context; the profile's gpu_layers apply (Metal)."""
    return BenchSetup(context_limit=None, kv_element_bytes=KV_ELEMENT_BYTES, gpu_layers=profile.gpu_layers,
                      accuracy_level=None, substitutions=())


def bench_runtime(bundle: Path, manifest: dict[str, Any], context: int, gpu_layers: int) -> BenchRuntime:
    """llama-cpp-python imported; a profile's GPU offload falls back to the CPU where this
    build has none, and a context past LongRoPE's switch is named."""
    import llama_cpp

    subs = []
    if gpu_layers and not llama_cpp.llama_supports_gpu_offload():
        layers = "all layers" if gpu_layers < 0 else f"{gpu_layers} layers"
        subs.append(f"gpu_layers: the profile offloads {layers} to the GPU (Metal on Apple silicon); this llama.cpp "
                    f"has no GPU offload on {platform.system()} {platform.machine()}, so every layer ran on the CPU")
        gpu_layers = 0
    if note := longrope_context_note(bundle / MODEL_FILE, context):
        subs.append(note)
    return BenchRuntime(versions={"llama-cpp-python": llama_cpp.__version__}, gpu_layers=gpu_layers,
                        substitutions=tuple(subs))


def bench_session(bundle: Path, manifest: dict[str, Any], threads: int, context: int,
                  gpu_layers: int) -> LlamaCppSession:
    return LlamaCppSession(bundle / MODEL_FILE, threads=threads, context=context, gpu_layers=gpu_layers)
