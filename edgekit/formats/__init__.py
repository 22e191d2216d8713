"""Format backends: how to write a bundle, open a session on one, and what the services need.

A format is a package exposing the attributes and functions of `FormatBackend` (module-level,
no classes to inherit). The registry maps a target name to its package and imports it only
when used, so a GGUF run never imports onnxruntime and `edgekit --help` stays fast.

Everything that differs by format lives behind this protocol: export, sessions, what bench
needs (the bundle's context cap, the KV cache's element size, GPU offload, a timed session),
the bundle README, the preflight cost, the plot colour and the shapes its tools mishandle. A third format is a new package here plus its
targets/<name>.toml; no module outside formats/ names a format.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from ..checkpoint import Checkpoint
    from ..progress import Progress
    from ..targets import Profile

# target name -> package implementing FormatBackend. The first entry is the default target.
REGISTRY: dict[str, str] = {
    "onnx-int4": "edgekit.formats.onnx_int4",  # ONNX int4 MatMulNBits, onnxruntime-genai
    "gguf-q4_k_m": "edgekit.formats.gguf_q4km",  # GGUF Q4_K_M, llama.cpp
}


@dataclass(frozen=True)
class ExportNotes:
    """What a backend tells the bundle writer about the files it produced."""

    quantization: dict[str, Any]  # effective settings, recorded in the manifest
    tools: dict[str, str]  # tool name -> version used
    path_taken: str  # e.g. "genai-builder", "optimum+MatMulNBits", "convert_hf_to_gguf+llama_model_quantize"
    notes: tuple[str, ...] = ()  # human remarks (fallbacks taken, tensors kept in higher precision)
    reproducible_files: tuple[str, ...] = ()  # files expected byte-identical on a rebuild


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    stopped_by: str  # "eos" | "max_tokens"


@dataclass(frozen=True)
class Trial:
    """One timed generation: the prompt's forward pass, the first token, the rest."""

    prefill_s: float
    first_token_s: float  # prefill + selecting the first token: time to first token
    decode_s: float  # the n_generated - 1 tokens after the first
    n_generated: int


@dataclass(frozen=True)
class ExportCost:
    """Resources an export needs, in MiB, from the checkpoint's shapes (edgekit.preflight):
    RAM = fixed + per_largest x (the largest tensor in fp32 MiB: embedding or lm_head)
    + per_layer x (one decoder layer in fp32 MiB), as a streamed export holds a layer and the
    big tables, not the model; disk = fixed + per_fp32_byte x (parameters x 4 bytes).
    Ceilings fitted on measured exports (benchmarks/preflight_fit.py); preflight refuses an
    export above them."""

    ram_fixed_mb: float
    ram_per_largest: float
    ram_per_layer: float
    disk_fixed_mb: float
    disk_per_fp32_byte: float
    # RAM of the path that holds the whole model (fixed + per_fp32_byte x parameters x 4 bytes),
    # for a format whose default path streams but which some recipes or architectures cannot
    # stream (the backend's why_not_streamed_export says when); None: the format has one path.
    whole_ram_fixed_mb: float | None = None
    whole_ram_per_fp32_byte: float | None = None


@dataclass(frozen=True)
class BenchSetup:
    """What bench resolves for one bundle on one profile, in the parent, before any runtime loads."""

    context_limit: int | None  # longest context the bundle's own files allow; None: the model config decides
    kv_element_bytes: int | None  # bytes per K/V cache element; None: unknown (bandwidth counts weights only)
    gpu_layers: int  # layers the runtime may offload (the profile's, or 0 where it runs on the CPU)
    accuracy_level: int | None  # compute type fixed at export, recorded with the figures; None: not applicable
    substitutions: tuple[str, ...]  # where the bundle cannot do what the profile asks, and what it does instead


@dataclass(frozen=True)
class BenchRuntime:
    """The runtime imported in the bench child (outside the load timing)."""

    versions: dict[str, str]  # package -> version, recorded with the figures
    gpu_layers: int  # what will really be offloaded on this host
    substitutions: tuple[str, ...]  # what this host changes (no GPU offload, LongRoPE factors at this context)


class Session(Protocol):
    """An open model in its own runtime (onnxruntime-genai or llama.cpp)."""

    def encode(self, text: str) -> list[int]:
        """Token ids the runtime's own tokenizer gives for text (special tokens parsed, no BOS added)."""

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat_prompt_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids the runtime feeds the model for a chat conversation, rendered the way a
        user of the plain runtime would (the bundle's chat template, then the runtime tokenizer)."""

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """Greedy decoding."""

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits, a float32 numpy array [len(ids), vocab] (vocab may be padded)."""

    def stepwise_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
        """Logits as an application meets them: the prompt in one prefill, then the continuation
        one token at a time. Rows: the prompt's last position, then one per continuation token
        but the last; fewer when the bundle's context ends first (the long-context probe)."""

    def close(self) -> None: ...


class TimedSession(Session, Protocol):
    """A session bench can time: runtime work only inside the timed regions."""

    def timed_generate(
        self,
        prompt_ids: Sequence[int],
        gen_tokens: int,
        probe: Callable[[str], None] | None = None,
        max_length: int | None = None,
    ) -> Trial:
        """One greedy generation of exactly `gen_tokens` tokens (EOS does not stop it).
        probe("prefill") and probe("decode") run after each phase, outside the timing.
        max_length: the KV cache length a runtime that sizes it per generation allocates
        (default prompt + gen_tokens); a runtime that sizes it when the session opens ignores it."""


class FormatBackend(Protocol):
    SUPPORTED_ARCHITECTURES: frozenset[str]
    FALLBACK_ARCHITECTURES: frozenset[str]  # exported by a second path when the first refuses
    LONG_CONTEXT_LIMITS: dict[str, str]  # what the long-context probe names, by where parity stops
    KNOWN_DIFFERENCES: dict[str, str]  # architecture -> how the runtime's graph differs from transformers
    PREFLIGHT_COST: ExportCost
    README_TEMPLATE: str  # str.format template of the bundle README (see readme_fields)
    PLOT_COLOR: str  # the format's colour in report plots

    def parse_recipe(self, table: dict[str, Any], where: str) -> Any:
        """Typed, validated recipe from the [recipe] table of targets/<name>.toml (+ overrides).
        Each backend returns its own frozen dataclass, which is what export() takes."""

    def export(self, checkpoint: Checkpoint, staging: Path, recipe: Any, progress: Progress) -> ExportNotes:
        """Write model files, tokenizer and chat template into `staging` (a fresh empty dir)."""

    def why_not_streamed_export(self, checkpoint: Checkpoint, recipe: Any) -> str | None:
        """None when this export takes the format's low-memory path (PREFLIGHT_COST's main
        figures), else why it holds the whole model (its whole_ram figures)."""

    def open_session(self, bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None) -> Session: ...

    def tool_versions(self) -> dict[str, str]: ...

    def config_problems(self, config: dict[str, Any]) -> list[str]:
        """Model shapes (config.json values) this format's tools mishandle, so that tiny test
        checkpoints avoid them and fail only where a real model would."""

    def readme_fields(self, manifest: dict[str, Any]) -> dict[str, str]:
        """Fields README_TEMPLATE needs beyond name, model, version, sha and figures."""

    def card_metadata(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The bundle README's Hugging Face model-card keys this format decides: `library_name`
        (what the hub files the repo under) and `tags` (format, quantization, runtime)."""

    def bench_setup(self, bundle: Path, manifest: dict[str, Any], profile: Profile) -> BenchSetup:
        """Cheap, runtime-free facts bench needs to plan a run (parent process)."""

    def bench_runtime(self, bundle: Path, manifest: dict[str, Any], context: int, gpu_layers: int) -> BenchRuntime:
        """Import the runtime (bench child, before the load timing) and say what this host changes."""

    def bench_session(
        self, bundle: Path, manifest: dict[str, Any], threads: int, context: int, gpu_layers: int
    ) -> TimedSession:
        """Open the bundle for timing with `threads` threads, a KV cache for `context` tokens."""


def backend(name: str) -> FormatBackend:
    from ..errors import BadInput

    if name not in REGISTRY:
        raise BadInput(f"unknown target '{name}'", f"Choose one of: {', '.join(sorted(REGISTRY))}, all")
    return importlib.import_module(REGISTRY[name])  # a module is structurally a FormatBackend


def default_format() -> str:
    """The target edgekit exports to when none is named: the registry's first entry."""
    return next(iter(REGISTRY))
