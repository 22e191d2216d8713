"""gguf-q4_k_m: a GGUF file in llama.cpp's Q4_K_M mix, run with llama-cpp-python.

Export path (both steps are llama.cpp's own tools, at the runtime's version):

    HF checkpoint --convert_hf_to_gguf.py (subprocess, lazy, f16)--> model-f16.gguf
                  --llama_model_quantize (in process)--------------> model.gguf

The converter writes the tokenizer and the chat template into the GGUF; the HF tokenizer
files are also copied beside it as the reference for users and for the parity check.
"""

# The protocol surface (edgekit.formats.FormatBackend); the registry imports this package.
from .benching import bench_runtime, bench_session, bench_setup
from .export import PREFLIGHT_COST, config_problems, export, tool_versions, why_not_streamed_export
from .limits import KNOWN_DIFFERENCES, LONG_CONTEXT_LIMITS
from .readme import PLOT_COLOR, README_TEMPLATE, card_metadata, readme_fields
from .recipe import FALLBACK_ARCHITECTURES, SUPPORTED_ARCHITECTURES, parse_recipe
from .session import open_session

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "FALLBACK_ARCHITECTURES",
    "LONG_CONTEXT_LIMITS",
    "KNOWN_DIFFERENCES",
    "PREFLIGHT_COST",
    "why_not_streamed_export",
    "README_TEMPLATE",
    "PLOT_COLOR",
    "parse_recipe",
    "export",
    "open_session",
    "tool_versions",
    "readme_fields",
    "card_metadata",
    "config_problems",
    "bench_setup",
    "bench_runtime",
    "bench_session",
]
