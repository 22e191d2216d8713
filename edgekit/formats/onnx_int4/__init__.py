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

# The protocol surface (edgekit.formats.FormatBackend); the registry imports this package.
from .architectures import FALLBACK_ARCHITECTURES, KNOWN_DIFFERENCES, LONG_CONTEXT_LIMITS, SUPPORTED_ARCHITECTURES
from .benching import bench_runtime, bench_session, bench_setup
from .export import PREFLIGHT_COST, config_problems, export, tool_versions, why_not_streamed_export
from .readme import PLOT_COLOR, README_TEMPLATE, card_metadata, readme_fields
from .recipe import parse_recipe
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
