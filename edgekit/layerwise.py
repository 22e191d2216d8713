"""A causal LM run one decoder block at a time, weights read per block from the safetensors.

The reference logits and the importance matrix need a forward pass of the unquantized model.
Loaded whole, a 3.8B bf16 checkpoint costs 7.6 GB (15 GB as float32) and a 14B one does not
fit a 24 GB machine at all. Here the model is built by transformers with its parameters on the
meta device (so every family's own modules compute: Phi-3's fused qkv, partial rotary, LongRoPE,
Gemma's scaled embeddings and sliding windows), and a pass over a list of sequences goes:

1. capture: the embedding (and the other small non-block weights) is loaded and the model's own
   forward runs with every decoder block replaced by a stand-in that records the arguments the
   block is called with (hidden states, masks, rotary cos/sin, cache positions) per sequence;
2. blocks: block i is read from the safetensors, run over the hidden states of every sequence,
   and dropped before block i + 1 is read;
3. head: the model's own forward runs again with stand-ins that hand back the last block's
   hidden states, so its final norm, lm_head and logit soft-capping apply; one sequence's
   logits exist at a time.

Peak memory is one block plus the embedding or the lm_head plus the hidden states of all the
positions, not the model. `resident_model` loads the whole model the ordinary way for when it
fits; `mode_for` picks between them from the checkpoint size and the memory available.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInput

if TYPE_CHECKING:
    from .checkpoint import CheckpointLike
    from .progress import Step

MODES = ("stream", "memory")
MODE_ENV = "EDGEKIT_REFERENCE"
# Stream when the weights in their compute dtype exceed this share of the available memory:
# the in-memory forward needs the weights plus activations, the runtime being verified and the
# caller's own state; past ~40 % a 24 GB host no longer holds a 3.8B bf16 model next to them.
STREAM_SHARE = 0.4

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}


def safetensors_headers(path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(file, {tensor name: {dtype, shape, ...}}) for every .safetensors file of a checkpoint,
    read from the headers only. With a model.safetensors.index.json only the shards it names:
    some repositories also carry another copy (Mistral's consolidated.safetensors)."""
    index = Path(path) / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({Path(path) / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(Path(path).glob("*.safetensors"))
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        yield file, header


def read_tensors(file_of: Mapping[str, Path], names: Sequence[str]) -> list[Any]:
    """Tensors `names` (torch, in their stored dtype) from the safetensors files `file_of` maps
    them to, each file opened for this call only. Every page a read touches stays in the
    process's RSS (as RssFile) for as long as the file's safe_open handle, and so its mapping,
    lives: a handle held over a whole export ends up counting every tensor it read, up to the
    checkpoint's size, on top of what is live. Opening per read costs one header parse."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(file_of[name], []).append(name)
    found: dict[str, Any] = {}
    for file, group in by_file.items():
        with safe_open(str(file), framework="pt") as h:
            for name in group:
                found[name] = h.get_tensor(name)
    return [found[name] for name in names]


def tensor_files(path: Path) -> dict[str, Path]:
    """Which .safetensors file of a checkpoint directory holds each tensor (the first file, in
    name order, for a name that two files hold), from the headers only."""
    file_of: dict[str, Path] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name in sorted(header):  # the order safe_open's keys() gives
            file_of.setdefault(name, file)
    return file_of


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def checkpoint_dtype(path: Path, config: dict[str, Any] | None = None) -> str:
    """The floating dtype most of the weight bytes are stored in ("bfloat16", "float16" or
    "float32"): what the checkpoint was published to run in. The headers decide, not
    config.json's torch_dtype, which some exports leave stale."""
    by_dtype: dict[str, int] = {}
    for _, header in safetensors_headers(path):
        for info in header.values():
            name = _FLOAT_NAMES.get(info["dtype"])
            if name:
                by_dtype[name] = by_dtype.get(name, 0) + _numel(info["shape"]) * _DTYPE_BYTES[info["dtype"]]
    if by_dtype:
        return max(by_dtype, key=lambda name: by_dtype[name])
    cfg = (config or {}).get("text_config") or config or {}
    declared = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return declared if declared in ("bfloat16", "float16") else "float32"


# What a half-precision checkpoint computes in on this host: "auto" (its own dtype where the CPU
# multiplies it natively, float32 elsewhere), "checkpoint" (always its own) or "float32".
DTYPE_ENV = "EDGEKIT_COMPUTE_DTYPE"
DTYPE_CHOICES = ("auto", "checkpoint", "float32")


def native_half(dtype: str) -> bool:
    """Whether this CPU multiplies `dtype` ("bfloat16"/"float16") in hardware. Without it torch
    emulates: measured on this project's 2-core AVX2 EPYC, a bf16 nn.Linear ran at 9.9 GFLOPS
    against 54 in float32 (a bf16 `@` at 0.2), and a 3.8B bf16 importance-matrix pass took over
    30 minutes where float32 blocks take a few."""
    import torch

    cpu = getattr(torch, "cpu", None)

    def has(name: str) -> bool:
        probe = getattr(cpu, name, None)
        return bool(probe()) if callable(probe) else False

    if dtype == "bfloat16":
        return has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported")
    if dtype == "float16":
        return has("_is_amx_fp16_supported")
    return True


def compute_dtype(stored: str) -> str:
    """The dtype the reference and the importance matrix compute in for a checkpoint stored in
    `stored`: its own where the host multiplies it natively, else float32 one block at a time
    (mode_for then streams, so no float32 copy of the whole model is ever held)."""
    choice = os.environ.get(DTYPE_ENV) or "auto"
    if choice not in DTYPE_CHOICES:
        raise BadInput(
            f"{DTYPE_ENV}={choice!r} is not a compute dtype choice",
            f"Set it to one of: {', '.join(DTYPE_CHOICES)} (or unset it)",
        )
    if stored == "float32" or choice == "checkpoint":
        return stored
    if choice == "float32":
        return "float32"
    return stored if native_half(stored) else "float32"


def weights_bytes(path: Path, dtype: str) -> int:
    """Bytes the checkpoint's floating weights take in `dtype` (integer tensors as stored)."""
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    total = 0
    for _, header in safetensors_headers(path):
        for info in header.values():
            n = _numel(info["shape"])
            total += n * (width if info["dtype"] in _FLOAT_NAMES else _DTYPE_BYTES.get(info["dtype"], 4))
    return total


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def mode_for(path: Path, dtype: str, requested: str | None = None) -> str:
    """ "stream" or "memory": `requested`, else $EDGEKIT_REFERENCE, else "stream" when a half-
    precision checkpoint computes in float32 or the weights in `dtype` would take more than
    STREAM_SHARE of the memory available now."""
    choice = requested or os.environ.get(MODE_ENV) or None
    if choice is not None:
        if choice not in MODES:
            raise BadInput(
                f"{MODE_ENV}={choice!r} is not a reference mode",
                f"Set it to one of: {', '.join(MODES)} (or unset it to choose by memory)",
            )
        return choice
    if dtype == "float32" and checkpoint_dtype(path) != "float32":
        return "stream"  # upcast block by block: a whole-model float32 copy is twice the checkpoint
    return "stream" if weights_bytes(path, dtype) > STREAM_SHARE * available_bytes() else "memory"


def resident_model(checkpoint: CheckpointLike, dtype: str, attn_implementation: str) -> Any:
    """The whole model in memory, as transformers loads it (for checkpoints that fit)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(checkpoint.path),
        dtype=getattr(torch, dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=checkpoint.trust_remote_code,
    ).eval()


def hook_linears(module: Any, prefix: str, hook_for: Callable[[str], Callable[..., None]]) -> list[Any]:
    """A forward hook, hook_for(name), on every nn.Linear under `module`, named `prefix` + its
    path (the full HF name); returns the handles. What the calibration passes' recorders attach."""
    import torch

    handles = []
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear):
            full = prefix + name if name else prefix.rstrip(".")
            handles.append(sub.register_forward_hook(hook_for(full)))
    return handles


class SquareSums:
    """Per nn.Linear input: sum over positions of x^2 per column (float64) and the position
    count, gathered by forward hooks; what the importance matrix averages."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def attach(self, module: Any, prefix: str = "") -> list[Any]:
        return hook_linears(module, prefix, self._hook)

    def _hook(self, name: str) -> Callable[..., None]:
        import torch

        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            self.sums[name] = self.sums.get(name, 0) + (x * x).sum(0)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return record

    def means(self) -> dict[str, Any]:
        import numpy as np
        import torch

        return {
            n: (self.sums[n] / self.counts[n]).to(torch.float32).numpy().astype(np.float32) for n in sorted(self.sums)
        }


def _stand_in(layer: Any, forward: Callable[..., Any]) -> Any:
    """A module that answers for `layer` inside the model's forward: attribute reads the
    forward makes (Gemma's and Qwen2's attention_type picks the mask) go to the real block."""
    import torch

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            object.__setattr__(self, "_real", layer)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(object.__getattribute__(self, "_real"), name)

        def forward(self, *args, **kwargs):
            return forward(*args, **kwargs)

    return StandIn()


class _Captured(Exception):
    """Raised by the last stand-in: the capture pass has what it needs."""


class LayerwiseModel:
    """A causal LM whose weights stay in the safetensors until a pass needs them, block by block."""

    def __init__(self, checkpoint: CheckpointLike, dtype: str, attn_implementation: str = "eager") -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations.accelerate import init_empty_weights

        self.path = Path(checkpoint.path)
        self.dtype = getattr(torch, dtype)
        self.files = {name: file for file, header in safetensors_headers(self.path) for name in header}
        if not self.files:
            raise BadInput(
                f"{self.path} has no .safetensors weights to stream",
                f"Convert the checkpoint to safetensors, or set {MODE_ENV}=memory",
            )
        config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=checkpoint.trust_remote_code)
        # Parameters on meta, buffers real: rotary inv_freq and Gemma's embed_scale are computed
        # in __init__ and are not in the checkpoint.
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(
                config,
                dtype=self.dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=checkpoint.trust_remote_code,
            ).eval()
        self.config = self.model.config
        n_layers = self.config.get_text_config().num_hidden_layers
        lists = [
            (n, m) for n, m in self.model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers
        ]
        if len(lists) != 1:
            raise BadInput(
                f"cannot find the decoder blocks of this {type(self.model).__name__}",
                f"Set {MODE_ENV}=memory to load the model whole",
            )
        self.blocks_name, self.blocks = lists[0]
        names = {id(m): n for n, m in self.model.named_modules()}
        self.head_name = names[id(self.model.get_output_embeddings())]
        self.embed_name = names[id(self.model.get_input_embeddings())]
        self.tuple_blocks: bool | None = None  # do the blocks return (hidden, ...)? learnt on first run

    # -- weights ------------------------------------------------------------------------------

    def _read(self, keys: Sequence[str], rename: Callable[[str], str]) -> dict[str, Any]:
        """Tensors for `keys` (state-dict names) from the safetensors, in the compute dtype.
        Files are opened per call and closed after, so no mapping outlives the block."""
        from safetensors import safe_open

        wanted = {k: rename(k) for k in keys}
        tied = self.embed_name + ".weight"
        for k, src in wanted.items():
            if src not in self.files and src == self.head_name + ".weight" and tied in self.files:
                wanted[k] = tied  # tied embeddings: lm_head is the embedding
        missing = [src for src in wanted.values() if src not in self.files]
        if missing:
            raise BadInput(
                f"{self.path.name}: the safetensors have no {missing[0]!r} ({len(missing)} weights missing)",
                f"Set {MODE_ENV}=memory to load the checkpoint through transformers",
            )
        out: dict[str, Any] = {}
        with ExitStack() as stack:
            handles = {}
            for k, src in wanted.items():
                file = self.files[src]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                t = handles[file].get_tensor(src)
                out[k] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def _load(self, module: Any, prefix: str, skip: Callable[[str], bool] = lambda k: False) -> None:
        keys = [k for k, v in module.state_dict().items() if v.is_meta and not skip(k)]
        module.load_state_dict(self._read(keys, lambda k: prefix + k), strict=False, assign=True)

    @staticmethod
    def _drop(module: Any) -> None:
        """Back to meta: the block's memory is freed, its buffers (computed, not stored) stay."""
        import torch

        for sub in module.modules():
            for name, p in list(sub.named_parameters(recurse=False)):
                if not p.is_meta:
                    setattr(sub, name, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    def _outside(self, key: str) -> bool:
        return key.startswith(self.blocks_name + ".")

    # -- one pass -----------------------------------------------------------------------------

    def run(
        self,
        sequences: Sequence[Sequence[int]],
        on_logits: Callable[[int, Any], None],
        *,
        caches: Sequence[Any] | None = None,
        logits_to_keep: int | Sequence[int] = 0,
        sums: SquareSums | None = None,
        progress_step: Step | None = None,
    ) -> None:
        """Forward every sequence (batch 1 each) through the model; on_logits(i, logits[n, vocab])
        per sequence, in order. `caches` (one transformers Cache per sequence, or None) are
        updated as the model's own forward would; `logits_to_keep` as the model's forward takes
        it (per sequence when a list); `sums` gathers the importance-matrix statistic."""
        import torch

        keep = list(logits_to_keep) if isinstance(logits_to_keep, (list, tuple)) else [logits_to_keep] * len(sequences)
        blocks = list(self.blocks)
        with torch.inference_mode():
            hidden, calls = self._capture(sequences, caches, blocks)
            for i, block in enumerate(blocks):
                self._load(block, f"{self.blocks_name}.{i}.")
                handles = sums.attach(block, f"{self.blocks_name}.{i}.") if sums is not None else []
                try:
                    for s in range(len(sequences)):
                        args, kwargs = calls[s][i]
                        out = block(hidden[s], *args[1:], **kwargs)
                        self.tuple_blocks = isinstance(out, tuple)
                        hidden[s] = out[0] if self.tuple_blocks else out
                finally:
                    for h in handles:
                        h.remove()
                    self._drop(block)
                if progress_step is not None:
                    progress_step.advance()
            self._head(hidden, keep, on_logits, sums, blocks)

    def _capture(
        self, sequences: Sequence[Sequence[int]], caches: Sequence[Any] | None, blocks: Any
    ) -> tuple[list[Any], list[list[tuple]]]:
        """The hidden states entering block 0 and each block's call arguments, per sequence."""
        import torch

        head_prefix = self.head_name + "."
        self._load(self.model, "", skip=lambda k: self._outside(k) or k.startswith(head_prefix))
        hidden: list[Any] = []
        calls: list[list[tuple]] = []
        try:
            for s, ids in enumerate(sequences):
                record: list[tuple] = []

                def catch(*args, _record=record, **kwargs):
                    _record.append((args, kwargs))
                    if len(_record) == len(blocks):
                        raise _Captured
                    return args[0]

                self._swap(blocks, [_stand_in(b, catch) for b in blocks])
                try:
                    cache = caches[s] if caches is not None else None
                    self.model(torch.tensor([list(ids)]), past_key_values=cache, use_cache=cache is not None)
                except _Captured:
                    pass
                finally:
                    self._swap(blocks, blocks)
                # A model that assigns block outputs directly hands a stand-in's return on as is;
                # one that indexes [0] would have taken the first row: stand-ins return the tensor
                # and the real block's output convention is applied in the head pass.
                hidden.append(record[0][0][0])
                calls.append(record)
        finally:
            self._drop(self.model.get_input_embeddings())
        return hidden, calls

    def _head(
        self, hidden: Any, keep: Any, on_logits: Callable[[int, Any], None], sums: SquareSums | None, blocks: Any
    ) -> None:
        """Final norm, lm_head and soft-capping by the model's own forward, one sequence at a time."""
        import torch

        self._load(self.model, "", skip=lambda k: self._outside(k) or k.startswith(self.embed_name + "."))
        handles = sums.attach(self.model.get_output_embeddings(), self.head_name) if sums is not None else []
        try:
            for s, h in enumerate(hidden):

                def replay(*args, _h=h, **kwargs):
                    return (_h,) if self.tuple_blocks else _h

                self._swap(blocks, [_stand_in(b, replay) for b in blocks])
                try:
                    zeros = torch.zeros(h.shape, dtype=h.dtype)
                    logits = self.model(inputs_embeds=zeros, use_cache=False, logits_to_keep=keep[s]).logits[0]
                finally:
                    self._swap(blocks, blocks)
                on_logits(s, logits)
                del logits
        finally:
            for handle in handles:
                handle.remove()
            self._drop(self.model)

    def _swap(self, blocks: Any, modules: Any) -> None:
        for i, m in enumerate(modules):
            self.blocks[i] = m

    # -- greedy continuation -------------------------------------------------------------------

    def eos_ids(self) -> set[int]:
        """The generation config's stop ids (generation_config.json when the checkpoint has one,
        as from_pretrained reads it)."""
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(str(self.path))
        except OSError:
            gen = self.model.generation_config
        eos = gen.eos_token_id
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def greedy(self, prompts: Sequence[Sequence[int]], n: int, progress_step: Step | None = None) -> list[list[int]]:
        """Argmax continuations of up to `n` tokens per prompt, stopping at EOS. One streamed
        pass per generated token serves every prompt still running, each with its own KV cache
        (a few MB per block at these lengths): n passes over the weights in all, not n per prompt."""
        from transformers import DynamicCache

        eos = self.eos_ids()
        caches = [DynamicCache(config=self.config) for _ in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        running = list(range(len(prompts)))
        inputs = {i: list(p) for i, p in enumerate(prompts)}
        for _ in range(n):
            if not running:
                break
            last: list[int] = []
            self.run(
                [inputs[i] for i in running],
                lambda s, logits, _last=last: _last.append(int(logits[-1].argmax())),  # type: ignore[misc]
                caches=[caches[i] for i in running],
                logits_to_keep=1,
            )
            picked = dict(zip(running, last))  # on_logits comes in sequence order
            for i in list(running):
                if picked[i] in eos:
                    running.remove(i)
                else:
                    out[i].append(picked[i])
                    inputs[i] = [picked[i]]
            if progress_step is not None:
                progress_step.advance()
        return out
