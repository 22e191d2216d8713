"""Importance matrix: how strongly each input channel of each linear layer is driven.

llama.cpp's `imatrix` tool runs a model over text and records, for every matrix
multiplication, the mean of the squared input activations per input column; quantizers then
weight each weight's rounding error by it (an error on a column that sees large inputs costs
more). edgekit computes the same statistic from the unquantized reference model itself, with
torch forward hooks on every nn.Linear, over a calibration text that is NOT the evaluation
text of `edgekit verify` (edgekit/data/calibration.txt vs data/eval.txt), so parity figures
are not measured on the data the quantizer was tuned on.

The result is keyed by Hugging Face module name ("model.layers.3.self_attn.q_proj") and
cached on disk (checkpoint content hash + calibration text + token budget + dtype + format
version). The budget is counted in tokens, as llama.cpp's imatrix counts chunks: the text is
cut, or repeated, to CALIBRATION_TOKENS tokens, so the cost and the statistic do not depend on
how finely a tokenizer splits it. The pass runs in the checkpoint's own dtype where the CPU
multiplies it natively, else in float32 block by block (layerwise.compute_dtype), and block by
block from the safetensors when the model would not fit comfortably in memory (edgekit.layerwise;
$EDGEKIT_REFERENCE=stream|memory forces it). Mappings to a
format's own tensor names live here too: `gguf_entries` for llama.cpp (blk.N.attn_q.weight,
checked against the tensors and row lengths of the GGUF being quantized) and
`llama_imatrix_param` for the `imatrix` field of llama_model_quantize_params.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .memory import release_memory

if TYPE_CHECKING:
    import numpy as np

    from .checkpoint import CheckpointLike
    from .progress import Progress

IMATRIX_FORMAT = 2  # bump when what is stored or how it is computed changes (2: token budget)
WINDOW = 512  # tokens per forward pass
# Calibration tokens per imatrix: edgekit's calibration text is 1785 SmolLM2 tokens, so the
# default cost at that size stays what it was when the whole text was used; a tokenizer that
# splits finer gets the text cut, a coarser one gets it repeated.
CALIBRATION_TOKENS = 1792


def calibration_text() -> str:
    return resources.files("edgekit").joinpath("data/calibration.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Imatrix:
    values: Mapping[str, Any]  # HF module name -> float32 [in_features]: mean squared input
    tokens: int  # positions the means are over (the budget plus one BOS per window)
    text_sha256: str
    key: str  # cache key
    cached: bool = False
    budget: int = CALIBRATION_TOKENS  # calibration tokens asked for (text cut or repeated to it)
    dtype: str = "float32"  # what the model computed in (layerwise.compute_dtype)
    mode: str = "memory"  # "memory" (whole model) or "stream" (block by block)
    # GPTQ's calibration inputs (weight_search = "gptq"; edgekit.activations), attached
    # by the export after loading; not part of the cached means
    activations: Any = None

    def summary(self) -> dict[str, Any]:
        return {
            "entries": len(self.values),
            "tokens": self.tokens,
            "budget_tokens": self.budget,
            "dtype": self.dtype,
            "mode": self.mode,
            "calibration_text_sha256": self.text_sha256,
            "key": self.key,
        }


def load_or_compute(
    checkpoint: CheckpointLike,
    text: str | None = None,
    progress: Progress | None = None,
    *,
    budget: int = CALIBRATION_TOKENS,
    mode: str | None = None,
) -> Imatrix:
    """The imatrix of `checkpoint` over `budget` tokens of `text` (default: edgekit's calibration
    text), from the cache when an identical computation was done before. `mode` "stream"/"memory"
    forces how the model runs (default: $EDGEKIT_REFERENCE, else by memory)."""
    import numpy as np

    from .layerwise import checkpoint_dtype, compute_dtype, mode_for
    from .paths import cache_dir

    text = calibration_text() if text is None else text
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    dtype = compute_dtype(checkpoint_dtype(checkpoint.path, checkpoint.config))
    key = calibration_key(checkpoint, text_sha, dtype, budget, v=IMATRIX_FORMAT)
    path = cache_dir() / "imatrix" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            tokens = int(data["__tokens__"])
            stored_mode = str(data["__mode__"]) if "__mode__" in data.files else "memory"
            values = {k: data[k] for k in data.files if not k.startswith("__")}
        return Imatrix(values, tokens, text_sha, key, cached=True, budget=budget, dtype=dtype, mode=stored_mode)
    mode = mode_for(checkpoint.path, dtype, mode)
    values, tokens = compute(checkpoint, text, dtype, progress, mode=mode, budget=budget)
    release_memory()  # the model is gone; an export runs next in this process, give its pages back
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}.npz"
    np.savez(tmp, __tokens__=np.int64(tokens), __mode__=np.str_(mode), **values)
    os.replace(tmp, path)
    return Imatrix(values, tokens, text_sha, key, budget=budget, dtype=dtype, mode=mode)


def calibration_key(checkpoint: CheckpointLike, text_sha: str, dtype: str, budget: int, **version: Any) -> str:
    """Cache key of a statistic of the calibration pass: what the checkpoint holds, the text,
    the windows, the compute dtype, the token budget, and `version` (the statistic's format)."""
    from .checkpoint import content_hash

    key_src = json.dumps(
        {
            **version,
            "ckpt": content_hash(checkpoint.path),
            "text": text_sha,
            "window": WINDOW,
            "dtype": dtype,
            "budget": budget,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key_src.encode()).hexdigest()[:32]


def compute(
    checkpoint: CheckpointLike,
    text: str,
    dtype: str = "float32",
    progress: Progress | None = None,
    *,
    mode: str = "memory",
    budget: int = CALIBRATION_TOKENS,
) -> tuple[dict[str, Any], int]:
    """Mean squared input activation per input column of every nn.Linear, over `budget` tokens
    of `text`; returns the means and the number of positions they are over."""
    from .layerwise import SquareSums

    sums = SquareSums()
    tokens = calibration_pass(checkpoint, text, sums, dtype, progress, mode=mode, budget=budget, what="imatrix")
    return sums.means(), tokens


def calibration_pass(
    checkpoint: CheckpointLike,
    text: str,
    recorder: Any,
    dtype: str = "float32",
    progress: Progress | None = None,
    *,
    mode: str = "memory",
    budget: int = CALIBRATION_TOKENS,
    what: str = "imatrix",
) -> int:
    """Run the reference model over `budget` tokens of `text` in windows of WINDOW, with
    `recorder` (anything with attach(module, prefix) -> hook handles: layerwise.SquareSums,
    activations.InputRecorder) hooked on every nn.Linear; returns the positions run."""
    import torch

    from .hftokenizer import load_tokenizer
    from .layerwise import LayerwiseModel, resident_model
    from .progress import NullProgress
    from .reference import repeat_to, tokenizer_bos, windows_of

    progress = progress or NullProgress()
    tokenizer = load_tokenizer(checkpoint.path, checkpoint.trust_remote_code)
    # verbose=False: cut to the budget and into windows, so transformers' "longer than the
    # maximum sequence length" warning would be about a sequence no model sees.
    ids = repeat_to(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, budget)
    windows = windows_of(ids, WINDOW, tokenizer_bos(tokenizer))
    # eager attention, as the reference: sdpa skips Gemma 2's attention logit soft-capping.
    if mode == "stream":
        model = LayerwiseModel(checkpoint, dtype, "eager")
        with progress.step(f"{what}: calibration text, block by block", total=len(model.blocks)) as step:
            model.run(windows, lambda i, logits: None, sums=recorder, progress_step=step)
    else:
        with progress.step(f"{what}: loading reference model"):
            model = resident_model(checkpoint, dtype, "eager")
        handles = recorder.attach(model)
        try:
            with torch.inference_mode(), progress.step(f"{what}: calibration text", total=len(windows)) as step:
                for w in windows:
                    model(torch.tensor([w]))
                    step.advance()
        finally:
            for h in handles:
                h.remove()
    del model
    return sum(len(w) for w in windows)


# ---------------------------------------------------------------------------------------------
# llama.cpp


def gguf_layout(gguf_path: Path) -> tuple[str, int, dict[str, int]]:
    """(general.architecture, block_count, 2-D tensor name -> row length ne[0]) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return f.contents() if f is not None else None

    arch = str(field("general.architecture") or "")
    n_blocks = int(field(f"{arch}.block_count") or 0)
    # 2-D only: llama.cpp wants n_per_row x n_expert values for a 3-D expert tensor, which a
    # per-module entry is not; those tensors are left unweighted rather than mis-sized.
    rows = {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2}
    return arch, n_blocks, rows


def gguf_entries(
    imatrix: Imatrix, arch: str, n_blocks: int, rows: Mapping[str, int]
) -> tuple[dict[str, Any], list[str]]:
    """imatrix values under the GGUF tensor names llama.cpp's quantizer looks up.

    Hugging Face module names are mapped with gguf-py's TensorNameMap for `arch`
    (general.architecture); an entry is kept only when the GGUF has that tensor and its row
    length equals the entry's length, because llama_model_quantize aborts on a size mismatch.
    Returns the entries and the module names that found no tensor (e.g. a tied lm_head).
    """
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        return {}, sorted(imatrix.values)
    names = gguf.get_tensor_name_map(by_name[arch], n_blocks)
    entries: dict[str, Any] = {}
    unmatched: list[str] = []
    for module, values in imatrix.values.items():
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target and rows.get(target) == len(values):
            entries[target] = values
        else:
            unmatched.append(module)
    return entries, unmatched


class LlamaImatrix:
    """The NULL-terminated llama_model_imatrix_data array that llama_model_quantize_params.imatrix
    points to ({name, data, size} per tensor, as llama.cpp's quantize tool builds it). Keeps the
    name buffers and float arrays alive for as long as this object lives."""

    def __init__(self, entries: Mapping[str, Any]):
        import llama_cpp
        import numpy as np

        self._names = [name.encode("utf-8") for name in sorted(entries)]
        self._data = [np.ascontiguousarray(entries[n.decode()], dtype=np.float32) for n in self._names]
        self.array = (llama_cpp.llama_model_imatrix_data * (len(self._names) + 1))()
        for i, (name, data) in enumerate(zip(self._names, self._data)):
            self.array[i].name = name
            self.array[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            self.array[i].size = data.size
        self.array[len(self._names)].name = None  # terminator

    def __len__(self) -> int:
        return len(self._names)

    @property
    def pointer(self) -> Any:
        import llama_cpp

        return ctypes.cast(self.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


# ---------------------------------------------------------------------------------------------
# onnxruntime-genai builder graphs


def onnx_node_modules(node_name: str) -> list[str]:
    """Hugging Face module names whose input is the input of a MatMul of the genai builder's
    graph (or optimum's), most likely first; [] for a node no module matches.

    Builder names look like /model/layers.3/attn/qkv_proj/MatMul_Q4 and /lm_head/MatMul_Q4;
    optimum's like /model/layers.3/self_attn/q_proj/MatMul. Only the input matters here, so a
    fused projection may take the entry of any module it fuses (q/k/v share their input, and
    so do gate/up).
    """
    import re

    m = re.match(r"^/model/layers\.(\d+)/(?:self_attn|attn|mlp)/(\w+?)/MatMul", node_name)
    if m:
        layer, proj = m.group(1), m.group(2)
        aliases = {
            "qkv_proj": ("qkv_proj", "q_proj", "query_key_value", "Wqkv"),
            "gate_proj": ("gate_proj", "gate_up_proj", "up_proj"),
            "up_proj": ("up_proj", "gate_up_proj", "gate_proj"),
            "q_proj": ("q_proj", "qkv_proj"),
            "k_proj": ("k_proj", "qkv_proj"),
            "v_proj": ("v_proj", "qkv_proj"),
            "o_proj": ("o_proj", "dense"),
            "down_proj": ("down_proj",),
        }.get(proj, (proj,))
        return [f"model.layers.{layer}.{part}.{alias}" for alias in aliases for part in ("self_attn", "mlp", "attn")]
    if re.match(r"^/lm_head/MatMul", node_name):
        return ["lm_head"]
    return []


def onnx_node_importance(imatrix: Imatrix, node_name: str, k: int) -> np.ndarray | None:
    """The imatrix entry for a MatMul of the genai builder's graph (or optimum's), or None.
    The length must equal the node's K."""
    for c in onnx_node_modules(node_name):
        values = imatrix.values.get(c)
        if values is not None and len(values) == k:
            return values
    return None
