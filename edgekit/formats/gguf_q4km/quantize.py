"""llama_model_quantize in process, with the imatrix handed over and llama.cpp's log parsed."""

from __future__ import annotations

import ctypes
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ...errors import ToolFailed
from .llamalog import LlamaLog
from .recipe import GgufRecipe

if TYPE_CHECKING:
    from ...checkpoint import Checkpoint
    from ...progress import Progress

# K-quants need rows that are a multiple of 256 values (QK_K).
_K_BLOCK = 256

# llama-quant.cpp logs "[  12/ 272]  blk.0.ffn_up.weight - [  576,  1536, 1, 1], type =    f16,
# converting to q5_0 .. size = ..." (or just "size = ..." for a tensor kept as is).
_QUANT_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+)")
_CONVERTING = re.compile(r"converting to (\w+)")
_IMATRIX_LINE = re.compile(r"have importance matrix data with (\d+) entries")
_FALLBACK = re.compile(r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\).*"
                       r"falling back to\s+(\S+)")


def importance_entries(checkpoint: Checkpoint, intermediate: Path, progress: Progress):
    """imatrix entries under the intermediate GGUF's tensor names, and what the manifest records."""
    from ... import imatrix as im

    data = im.load_or_compute(checkpoint, progress=progress)
    with progress.step("imatrix: map to GGUF tensors"):
        arch, n_blocks, rows = im.gguf_layout(intermediate)
        entries, unmatched = im.gguf_entries(data, arch, n_blocks, rows)
    if not entries:
        raise ToolFailed(f"none of the {len(data.values)} imatrix entries maps to a tensor of this {arch!r} GGUF",
                         "Export with --set imatrix=none")
    info = {**data.summary(), "tensors": len(entries), "unmatched_modules": unmatched}
    return entries, info


def quantize(src: Path, dst: Path, recipe: GgufRecipe, progress: Progress,
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
        from ...imatrix import LlamaImatrix

        keepalive = LlamaImatrix(importance)  # must outlive the C call
        params.imatrix = keepalive.pointer
    types: dict[str, str] = {}
    fallbacks: list[tuple[str, int, str, str]] = []
    with progress.step(f"quantize {recipe.quant_type}") as step, LlamaLog() as log:
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


def fallback_notes(fallbacks: list[tuple[str, int, str, str]]) -> Iterator[str]:
    if not fallbacks:
        return
    by_change = Counter((wanted, used) for _, _, wanted, used in fallbacks)
    rows = sorted({ncols for _, ncols, _, _ in fallbacks})
    changes = ", ".join(f"{n} x {wanted} -> {used}" for (wanted, used), n in sorted(by_change.items()))
    yield (f"{len(fallbacks)} tensors fell back from K-quants because their row length "
           f"({', '.join(map(str, rows))}) is not a multiple of {_K_BLOCK}: {changes}")
