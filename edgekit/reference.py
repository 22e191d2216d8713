"""The unquantized reference: teacher-forced logits from transformers, cached on disk.

Cache key = checkpoint content hash + token ids hash + dtype + window, so a second verify of
any bundle made from the same checkpoint never loads the reference model again. Logits are
stored one float32 .npy per window and memory-mapped on read: peak memory stays at one window
of logits however long the evaluation text is.

The model computes in the checkpoint's own dtype (a bf16 checkpoint is not upcast to a float32
copy twice its size); logits are stored as float32. Where the weights would not fit comfortably
in memory the forward runs block by block from the safetensors (edgekit.layerwise, mode
"stream"), else with the whole model loaded ("memory"); both give the same logits, so the mode
is recorded but is not part of the cache key. $EDGEKIT_REFERENCE=stream|memory forces one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInput
from .hftokenizer import load_tokenizer
from .memory import release_memory
from .paths import cache_dir

if TYPE_CHECKING:
    import numpy as np

    from .checkpoint import CheckpointLike
    from .progress import Progress

REFERENCE_FORMAT = 1  # bump when what is stored changes
DEFAULT_WINDOW = 512


def default_eval_text() -> str:
    return resources.files("edgekit").joinpath("data/eval.txt").read_text(encoding="utf-8")


def load_eval_text(path: str | Path | None) -> str:
    if path is None:
        return default_eval_text()
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--eval-text {p} is not a file", "Pass a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"--eval-text {p} is not UTF-8 text", "Convert it to UTF-8") from None
    if not text.strip():
        raise BadInput(f"--eval-text {p} is empty", "Pass a file with at least a few sentences")
    return text


def reference_dtype(checkpoint: CheckpointLike | None = None) -> str:
    """The dtype the reference computes in: the checkpoint's own where this CPU multiplies it
    natively (an fp32 copy of a 3.8B bf16 model is 15 GB), else float32 streamed block by block
    (layerwise.compute_dtype); fp32 for fp32 checkpoints and without a checkpoint."""
    if checkpoint is None:
        return "float32"
    from .layerwise import checkpoint_dtype, compute_dtype

    return compute_dtype(checkpoint_dtype(checkpoint.path, checkpoint.config))


def windows_of(ids: Sequence[int], window: int, bos: int | None) -> list[list[int]]:
    """Split ids into non-overlapping windows; each starts with BOS when the tokenizer uses one,
    as a fresh prompt would."""
    step = window - (1 if bos is not None else 0)
    out: list[list[int]] = []
    for start in range(0, len(ids), step):
        chunk = list(ids[start : start + step])
        if len(chunk) < 2 and out:
            out[-1] += chunk  # never leave a window with nothing to predict
            continue
        out.append(([bos] if bos is not None else []) + chunk)
    return out


def tokenizer_bos(tokenizer: Any) -> int | None:
    """The BOS id if this tokenizer adds one to plain text (Llama/Phi-3 SentencePiece), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


@dataclass(frozen=True)
class Reference:
    key: str
    directory: Path
    windows: tuple[tuple[int, ...], ...]
    dtype: str
    greedy: dict[str, list[int]]  # prompt text -> reference greedy continuation ids
    prompt_ids: dict[str, list[int]]  # prompt text -> ids fed to both models
    cached: bool  # True if nothing had to be computed
    mode: str = "memory"  # how it was computed: "memory" (whole model) or "stream" (block by block)

    def logits(self, i: int) -> np.ndarray:
        import numpy as np

        return np.load(self.directory / f"window_{i:04d}.npy", mmap_mode="r")


def build_reference(
    checkpoint: CheckpointLike,
    text: str,
    prompts: Sequence[str],
    greedy_tokens: int,
    window: int = DEFAULT_WINDOW,
    progress: Progress | None = None,
    mode: str | None = None,
) -> Reference:
    """Reference logits for `text` and greedy continuations for `prompts`, from the cache if present.
    `mode` "stream"/"memory" forces how it is computed (default: $EDGEKIT_REFERENCE, else by memory)."""
    from .checkpoint import content_hash
    from .progress import NullProgress

    progress = progress or NullProgress()
    tokenizer = load_tokenizer(checkpoint.path, checkpoint.trust_remote_code)
    # verbose=False: the text is cut into WINDOW-token windows below, so transformers' "longer
    # than the specified maximum sequence length" warning is about a sequence no model sees.
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    if len(ids) < 2:
        raise BadInput(
            f"the evaluation text is {len(ids)} token(s) long", "Pass a text of at least two tokens (a few sentences)"
        )
    bos = tokenizer_bos(tokenizer)
    windows = windows_of(ids, window, bos)
    prompt_ids = {p: _prompt_ids(tokenizer, p, bos) for p in prompts}
    dtype = reference_dtype(checkpoint)
    key_src = json.dumps(
        {
            "v": REFERENCE_FORMAT,
            "ckpt": content_hash(checkpoint.path),
            "windows": windows,
            "prompts": prompt_ids,
            "greedy": greedy_tokens,
            "dtype": dtype,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    directory = cache_dir() / "reference" / key
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return Reference(
            key,
            directory,
            tuple(map(tuple, windows)),
            dtype,
            meta["greedy"],
            prompt_ids,
            cached=True,
            mode=meta.get("mode", "memory"),
        )

    from .layerwise import mode_for

    mode = mode_for(checkpoint.path, dtype, mode)
    greedy = _compute(checkpoint, windows, prompt_ids, greedy_tokens, dtype, mode, directory, progress)
    return Reference(key, directory, tuple(map(tuple, windows)), dtype, greedy, prompt_ids, cached=False, mode=mode)


def _prompt_ids(tokenizer: Any, prompt: str, bos: int | None) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return ([bos] if bos is not None else []) + ids


def _compute(
    checkpoint: CheckpointLike,
    windows: list[list[int]],
    prompt_ids: dict[str, list[int]],
    greedy_tokens: int,
    dtype: str,
    mode: str,
    directory: Path,
    progress: Progress,
) -> dict[str, list[int]]:
    import numpy as np

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()

    def save(i: int, logits: Any) -> None:  # a torch tensor
        np.save(tmp / f"window_{i:04d}.npy", logits.float().numpy().astype(np.float32))

    try:
        # eager attention: sdpa skips Gemma 2's attention logit soft-capping.
        if mode == "stream":
            greedy = _compute_streamed(checkpoint, windows, prompt_ids, greedy_tokens, dtype, save, progress)
        else:
            greedy = _compute_resident(checkpoint, windows, prompt_ids, greedy_tokens, dtype, save, progress)
        release_memory()  # the model is gone; the runtime under test loads next in this process
        (tmp / "meta.json").write_text(
            json.dumps({"greedy": greedy, "dtype": dtype, "mode": mode, "windows": len(windows)})
        )
        _publish_entry(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return greedy


def _compute_resident(
    checkpoint: CheckpointLike,
    windows: list[list[int]],
    prompt_ids: dict[str, list[int]],
    greedy_tokens: int,
    dtype: str,
    save: Callable[[int, Any], None],
    progress: Progress,
) -> dict[str, list[int]]:
    import torch

    from .layerwise import resident_model

    with progress.step("loading reference model"):
        model = resident_model(checkpoint, dtype, "eager")
    with torch.inference_mode():
        with progress.step("reference logits", total=len(windows)) as step:
            for i, w in enumerate(windows):
                save(i, model(torch.tensor([w])).logits[0])
                step.advance()
        greedy = {}
        with progress.step("reference greedy", total=len(prompt_ids)) as step:
            for prompt, ids in prompt_ids.items():
                greedy[prompt] = _greedy(model, ids, greedy_tokens)
                step.advance()
    return greedy


def _compute_streamed(
    checkpoint: CheckpointLike,
    windows: list[list[int]],
    prompt_ids: dict[str, list[int]],
    greedy_tokens: int,
    dtype: str,
    save: Callable[[int, Any], None],
    progress: Progress,
) -> dict[str, list[int]]:
    from .layerwise import LayerwiseModel

    model = LayerwiseModel(checkpoint, dtype, "eager")
    with progress.step("reference logits, block by block", total=len(model.blocks)) as step:
        model.run(windows, save, progress_step=step)
    with progress.step("reference greedy, block by block", total=greedy_tokens) as step:
        outs = model.greedy(list(prompt_ids.values()), greedy_tokens, progress_step=step)
    return dict(zip(prompt_ids, outs))


def _publish_entry(tmp: Path, directory: Path) -> None:
    """A finished cache entry appears whole; if another process finished first, keep theirs."""
    if directory.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def _greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Plain argmax loop with a KV cache; stops at EOS like the runtimes' sessions do."""
    import torch

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out: list[int] = []
    past = None
    inp = torch.tensor([ids])
    for _ in range(n):
        res = model(inp, past_key_values=past, use_cache=True)
        past = res.past_key_values
        tok = int(res.logits[0, -1].argmax())
        if tok in eos_ids:
            break
        out.append(tok)
        inp = torch.tensor([[tok]])
    return out


def reference_info(ref: Reference) -> dict[str, Any]:
    return {
        "key": ref.key,
        "dtype": ref.dtype,
        "mode": ref.mode,
        "windows": len(ref.windows),
        "tokens": sum(len(w) for w in ref.windows),
        "cached": ref.cached,
    }


def probe_ids(tokenizer: Any, text: str, total: int) -> list[int]:
    """`total` token ids of `text` repeated as often as needed, BOS first when the tokenizer
    adds one: the long-context probe's input."""
    bos = tokenizer_bos(tokenizer)
    piece = tokenizer(text, add_special_tokens=False, verbose=False).input_ids  # cut below: no warning
    if not piece:
        raise BadInput("the evaluation text has no tokens", "Pass a text of a few sentences")
    head = [bos] if bos is not None else []
    return head + repeat_to(piece, total - len(head))


def repeat_to(piece: Sequence[int], total: int) -> list[int]:
    """Exactly `total` ids: `piece` cut, or repeated as often as needed."""
    if not piece:
        raise BadInput("the calibration text has no tokens", "Pass a text of a few sentences")
    reps = -(-total // len(piece))
    return (list(piece) * reps)[:total]


def long_reference(
    checkpoint: CheckpointLike,
    ids: Sequence[int],
    prompt_tokens: int,
    boundary: int,
    progress: Progress | None = None,
    mode: str | None = None,
) -> np.ndarray:
    """Reference logits for the long-context probe, [len(ids) - prompt_tokens, vocab] float32
    (memory-mapped from the cache): positions prompt_tokens - 1 .. len(ids) - 2, each as a
    forward pass over its own prefix would give it (see edgekit.longcontext)."""
    import numpy as np

    from .checkpoint import content_hash
    from .progress import NullProgress

    progress = progress or NullProgress()
    ids = [int(t) for t in ids]
    dtype = reference_dtype(checkpoint)
    key_src = json.dumps(
        {
            "v": REFERENCE_FORMAT,
            "kind": "long",
            "ckpt": content_hash(checkpoint.path),
            "ids": ids,
            "prompt": prompt_tokens,
            "boundary": boundary,
            "dtype": dtype,
        },
        sort_keys=True,
    )
    directory = cache_dir() / "reference" / ("long-" + hashlib.sha256(key_src.encode()).hexdigest()[:32])
    path = directory / "logits.npy"
    if not path.is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        from .layerwise import mode_for

        try:
            logits = _long_logits(
                checkpoint, ids, prompt_tokens, boundary, dtype, mode_for(checkpoint.path, dtype, mode), progress
            )
            np.save(tmp / "logits.npy", logits)
            _publish_entry(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return np.load(path, mmap_mode="r")


def _long_logits(
    checkpoint: CheckpointLike,
    ids: list[int],
    prompt_tokens: int,
    boundary: int,
    dtype: str,
    mode: str,
    progress: Progress,
) -> np.ndarray:
    import numpy as np
    import torch

    from .layerwise import LayerwiseModel, resident_model

    cfg = checkpoint.config.get("text_config") or checkpoint.config
    # eager only where sdpa would be wrong (Gemma 2's soft-capping): at 4k+ tokens eager's
    # attention matrices cost gigabytes.
    attn = "eager" if cfg.get("attn_logit_softcapping") else "sdpa"
    n = len(ids)
    # Positions prompt_tokens-1 .. boundary-1 see at most `boundary` tokens: short factors.
    # Positions boundary .. n-2 see more: the long factors, over their whole prefix.
    sequences = [ids[:boundary], ids[: n - 1]]
    keep = [boundary - prompt_tokens + 1, n - 1 - boundary]
    parts: list[Any] = [None, None]

    def take(i: int, logits: Any) -> None:  # a torch tensor
        parts[i] = logits.float().numpy().astype(np.float32)

    if mode == "stream":
        model = LayerwiseModel(checkpoint, dtype, attn)
        with progress.step(
            "reference logits past the original context, block by block", total=len(model.blocks)
        ) as step:
            model.run(sequences, take, logits_to_keep=keep, progress_step=step)
    else:
        with progress.step("loading reference model"):
            model = resident_model(checkpoint, dtype, attn)
        with torch.inference_mode(), progress.step("reference logits past the original context", total=2) as step:
            for i, (seq, k) in enumerate(zip(sequences, keep)):
                take(i, model(torch.tensor([seq]), logits_to_keep=k).logits[0])
                step.advance()
    del model
    return np.concatenate(parts)
