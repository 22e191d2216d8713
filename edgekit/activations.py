"""Calibration inputs of every linear layer, for GPTQ (the recipe key weight_search = "gptq").

The importance matrix (imatrix.py) keeps one number per input column: the mean of x^2. GPTQ
needs how the columns move together, the second moments H = X^T X / n. H is K x K (256 MiB
for a 3B model's 8192-wide down projection in float32, a GiB per layer), while the calibration
pass has only ~1800 positions, so what is kept is X itself: each linear input over the
calibration text, in the compute dtype, and H is formed when a node is quantized.

The pass is imatrix.calibration_pass (same text, token budget and windows; block by block from
the safetensors when the model does not fit), with InputRecorder as its hooks. Inputs are
written to safetensors files as the pass goes (one per block when streamed), so memory holds one
block's inputs, and cached on disk under the checkpoint's content hash like the imatrix.
Modules that read the very same tensor (q/k/v, gate/up) store it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from .checkpoint import CheckpointLike
    from .progress import Progress

ACTIVATIONS_FORMAT = 1  # bump when what is stored or how it is computed changes
INDEX = "index.json"


@dataclass(frozen=True)
class Activations:
    """Cached calibration inputs: module name -> (file, tensor) in `root`."""

    root: Path
    index: Mapping[str, tuple[str, str]]
    tokens: int
    key: str
    cached: bool = False
    dtype: str = "float32"
    mode: str = "memory"

    def summary(self) -> dict[str, Any]:
        return {
            "modules": len(self.index),
            "tensors": len(set(self.index.values())),
            "tokens": self.tokens,
            "dtype": self.dtype,
            "mode": self.mode,
            "key": self.key,
        }

    def second_moments(self, modules: Sequence[str], k: int) -> np.ndarray | None:
        """H = X^T X / n (float32 [k, k]) of the first of `modules` recorded with k input
        columns, or None when none was."""
        import torch
        from safetensors import safe_open

        for name in modules:
            entry = self.index.get(name)
            if entry is None:
                continue
            file, tensor = entry
            with safe_open(str(self.root / file), framework="pt") as f:
                if f.get_slice(tensor).get_shape()[-1] != k:
                    continue
                x = f.get_tensor(tensor).to(torch.float32)
            return (x.T @ x).div_(x.shape[0]).numpy()
        return None


class InputRecorder:
    """Forward hooks that keep each nn.Linear's input rows, written to `root` block by block.

    attach() is what imatrix.calibration_pass calls (once on the whole model, or once per block
    and once on lm_head when streamed); each attach writes out what the previous one gathered,
    so a streamed pass holds one block's inputs."""

    def __init__(self, root: Path):
        self.root = root
        self.index: dict[str, tuple[str, str]] = {}
        self._rows: dict[str, list[Any]] = {}
        self._alias: dict[str, str] = {}
        self._last: tuple[Any, str] | None = None  # (input tensor, module that stored it)
        self._files = 0

    def attach(self, module: Any, prefix: str = "") -> list[Any]:
        from .layerwise import hook_linears

        self.flush()
        return hook_linears(module, prefix, self._hook)

    def _hook(self, name: str) -> Callable[..., None]:
        def record(module, inputs, output):
            x = inputs[0]
            if self._last is not None and x is self._last[0] and self._last[1] != name:
                # the tensor the module just before read (q/k/v, gate/up): stored once
                self._alias[name] = self._last[1]
                return
            self._last = (x, name)
            self._rows.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).clone())

        return record

    def flush(self) -> None:
        """Write the inputs gathered since the last flush to one safetensors file."""
        import torch
        from safetensors.torch import save_file

        self._last = None
        if not self._rows:
            return
        file = f"inputs-{self._files:05d}.safetensors"
        tensors = {name: torch.cat(rows).contiguous() for name, rows in self._rows.items()}
        save_file(tensors, str(self.root / file))
        for name in tensors:
            self.index[name] = (file, name)
        for name, target in self._alias.items():
            if target in tensors:
                self.index[name] = (file, target)
        self._rows, self._alias = {}, {}
        self._files += 1


def load_or_compute(
    checkpoint: CheckpointLike,
    text: str | None = None,
    progress: Progress | None = None,
    *,
    budget: int | None = None,
    mode: str | None = None,
) -> Activations:
    """The calibration inputs of `checkpoint` over the imatrix's text and token budget, from
    the cache when the same pass was run before."""
    from .imatrix import CALIBRATION_TOKENS, calibration_key, calibration_pass, calibration_text
    from .layerwise import checkpoint_dtype, compute_dtype, mode_for
    from .memory import release_memory
    from .paths import cache_dir

    text = calibration_text() if text is None else text
    budget = CALIBRATION_TOKENS if budget is None else budget
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    dtype = compute_dtype(checkpoint_dtype(checkpoint.path, checkpoint.config))
    key = calibration_key(checkpoint, text_sha, dtype, budget, v=ACTIVATIONS_FORMAT, kind="activations")
    root = cache_dir() / "activations" / key
    if (root / INDEX).is_file():
        meta = json.loads((root / INDEX).read_text())
        index = {k: tuple(v) for k, v in meta["index"].items()}
        return Activations(root, index, meta["tokens"], key, cached=True, dtype=dtype, mode=meta["mode"])
    mode = mode_for(checkpoint.path, dtype, mode)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        recorder = InputRecorder(tmp)
        tokens = calibration_pass(
            checkpoint, text, recorder, dtype, progress, mode=mode, budget=budget, what="GPTQ inputs"
        )
        recorder.flush()
        release_memory()
        meta = {"index": recorder.index, "tokens": tokens, "mode": mode}
        (tmp / INDEX).write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.replace(tmp, root)  # whole or not at all; a concurrent run's copy is as good
        except OSError:
            if not (root / INDEX).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index = {k: tuple(v) for k, v in recorder.index.items()}
    return Activations(root, index, tokens, key, dtype=dtype, mode=mode)
