"""Format backends: how to write a bundle and how to open a session on one.

A format is a module exposing the functions of `FormatBackend` (module-level functions,
no classes to inherit). The registry maps a target name to its module path and imports it
only when used, so a GGUF run never imports onnxruntime and `edgekit --help` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

# target name -> module implementing FormatBackend
REGISTRY: dict[str, str] = {
    "onnx-int4": "edgekit.formats.onnx_int4",
    "gguf-q4_k_m": "edgekit.formats.gguf_q4km",
}


@dataclass(frozen=True)
class ExportNotes:
    """What a backend tells the bundle writer about the files it produced."""

    quantization: dict[str, Any]           # effective settings, recorded in the manifest
    tools: dict[str, str]                   # tool name -> version used
    path_taken: str                         # e.g. "genai-builder", "optimum+MatMulNBits", "convert_hf_to_gguf+llama_model_quantize"
    notes: tuple[str, ...] = ()             # human remarks (fallbacks taken, tensors kept in higher precision)
    reproducible_files: tuple[str, ...] = ()  # files expected byte-identical on a rebuild


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    stopped_by: str  # "eos" | "max_tokens"


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

    def logits(self, ids: Sequence[int]) -> Any:
        """Teacher-forced logits, a float32 numpy array [len(ids), vocab] (vocab may be padded)."""

    def stepwise_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int]) -> Any:
        """Logits as an application meets them: the prompt in one prefill, then the continuation
        one token at a time. Rows: the prompt's last position, then one per continuation token
        but the last; fewer when the bundle's context ends first (the long-context probe)."""

    def close(self) -> None: ...


class FormatBackend(Protocol):
    SUPPORTED_ARCHITECTURES: frozenset[str]

    def parse_recipe(self, table: dict[str, Any], where: str) -> Any:
        """Typed, validated recipe from the [recipe] table of targets/<name>.toml (+ overrides)."""

    def export(self, checkpoint: Any, staging: Path, recipe: Any, progress: Any) -> ExportNotes:
        """Write model files, tokenizer and chat template into `staging` (a fresh empty dir)."""

    def open_session(self, bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None) -> Session: ...

    def tool_versions(self) -> dict[str, str]: ...


def backend(name: str) -> FormatBackend:
    from ..errors import BadInput

    if name not in REGISTRY:
        raise BadInput(f"unknown target '{name}'", f"Choose one of: {', '.join(sorted(REGISTRY))}, all")
    return importlib.import_module(REGISTRY[name])  # type: ignore[return-value]
