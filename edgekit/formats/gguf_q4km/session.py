"""LlamaCppSession: a model.gguf open in llama-cpp-python, talking token ids."""

from __future__ import annotations

import codecs
import ctypes
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ...errors import BadInput, ToolFailed
from .. import Generation, Trial
from .llamalog import LlamaLog, read_metadata
from .recipe import DEFAULT_CONTEXT, MODEL_FILE

if TYPE_CHECKING:
    import numpy as np


def open_session(
    bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None, *, context: int = DEFAULT_CONTEXT
) -> LlamaCppSession:
    """Open the bundle's model.gguf with llama-cpp-python. `context` bounds prompt + output
    tokens; the model's training context is not used as the default because it sizes the KV
    cache (a 128k-context model would reserve gigabytes)."""
    model = Path(bundle_dir) / MODEL_FILE
    if not model.is_file():
        raise BadInput(
            f"{bundle_dir} has no {MODEL_FILE}", "Pass a gguf-q4_k_m bundle directory made by edgekit export"
        )
    trained = _trained_context(model)
    return LlamaCppSession(model, threads=threads, context=min(context, trained) if trained else context)


def longrope_context_note(model: Path, context: int) -> str | None:
    """What a context above LongRoPE's original one changes in llama.cpp, or None. edgekit
    run opens DEFAULT_CONTEXT (4096, the Phi models' original context), where the factors are
    those transformers uses for such lengths; a benchmark profile may ask for more."""
    # The converter writes original_context_length for every Phi-3, but the attention factor
    # only in its LongRoPE (and YaRN) branch: that is what says the factors switch.
    value = read_metadata(model, ("{arch}.rope.scaling.original_context_length", "{arch}.rope.scaling.attn_factor"))
    original = value["{arch}.rope.scaling.original_context_length"]
    longrope = value["{arch}.rope.scaling.attn_factor"] is not None
    if longrope and original and original.isdigit() and context > int(original):
        return (
            f"context {context} > {original}: llama.cpp applies LongRoPE's long factors at every position "
            f"(transformers uses the short ones for sequences of up to {original} tokens); speed and memory "
            "are what they would be either way"
        )
    return None


def _trained_context(model: Path) -> int | None:
    """<arch>.context_length: a context past it only invites garbage (and a llama.cpp warning)."""
    value = read_metadata(model, ("{arch}.context_length",))["{arch}.context_length"]
    return int(value) if value and value.isdigit() else None


def _default_threads() -> int:
    # llama-cpp-python's own default is cpu_count // 2, one thread on a 2-core machine.
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class _TextStream:
    """Token ids -> text pieces. A UTF-8 character can span tokens (byte-fallback pieces, or
    byte-level BPE splitting an emoji): its bytes are held back until it is complete."""

    def __init__(self, piece: Callable[[int], bytes]):
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class LlamaCppSession:
    """A model.gguf open in llama.cpp, talking token ids.

    encode() parses special tokens and never adds BOS (the Session contract); chat prompts
    get the runtime's BOS rule instead, see chat_prompt_ids().
    """

    def __init__(self, model_path: Path, threads: int | None, context: int, gpu_layers: int = 0):
        import llama_cpp

        n = threads or _default_threads()
        self._lib = llama_cpp
        offload: dict[str, Any] = {"n_gpu_layers": gpu_layers} if gpu_layers else {}
        # Read, not memory-mapped: on CPUs where llama.cpp repacks weights (CPU_REPACK: Q4_K
        # into interleaved rows on AVX2/AVX512 x86 and on ARM) the mapped file pages it copied
        # from stay resident beside the repacked copy, so RSS is about twice the model
        # (llama.cpp issue 16761). Phi-3-medium's 8.0 GiB Q4_K_M: verify peaked at 15.2 GiB
        # mapped (benchmarks/results/gguf_mmap.md has both ways side by side).
        # llama-cpp-python maps llama.cpp's log levels off by one (ggml's WARN=3 is its ERROR)
        # and so prints warnings even with verbose=False; capturing the log keeps stderr clean and gives load errors a reason.
        with LlamaLog() as log:
            try:
                self._llm: Any = llama_cpp.Llama(
                    model_path=str(model_path),
                    n_ctx=context,
                    n_threads=n,
                    n_threads_batch=n,
                    verbose=False,
                    logits_all=False,
                    use_mmap=False,  # read, not mapped: see above
                    **offload,
                )
            except ValueError as e:
                if gpu_layers:
                    raise ToolFailed(
                        f"llama.cpp could not load {model_path} with {gpu_layers} GPU layers: {log.first_error() or e}",
                        "Benchmark a CPU profile instead",
                    ) from None
                raise ToolFailed(
                    f"llama.cpp could not load {model_path}: {log.first_error() or e}",
                    "Re-export the bundle; check that llama-cpp-python is the version it was built with",
                ) from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.context = context
        self._model_path, self._threads = model_path, threads

    # tokenizer -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The runtime tokenizer's ids: special tokens written in text are parsed as such, and
        no BOS is added even when the vocabulary asks for one (callers add it if they want)."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: Sequence[int]) -> str:
        """llama.cpp's detokenizer: control tokens render as nothing, and a SentencePiece
        vocabulary's leading space is dropped, as transformers' decode does."""
        arr = (self._lib.llama_token * len(ids))(*ids)
        size = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n  # too small: llama.cpp returns the size it needs, negated
        raise ToolFailed("llama_detokenize failed")

    def _piece(self, token: int) -> bytes:
        # llama-cpp-python's helpers use a fixed 32-byte buffer and silently truncate longer
        # pieces (long runs of spaces in code vocabularies); grow the buffer instead.
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def text_stream(self) -> _TextStream:
        return _TextStream(self._piece)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    # chat --------------------------------------------------------------------------------

    def chat_template(self) -> str | None:
        raw = self._lib.llama_model_chat_template(self._llm.model, None)
        return raw.decode("utf-8") if raw else None

    def chat_prompt_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Render the GGUF's own chat template with llama-cpp-python's Jinja2ChatFormatter
        (bos/eos strings from the GGUF vocabulary), then tokenize with special tokens parsed.

        BOS follows llama.cpp's rule (llama-server, llama-cli): prepended when the vocabulary
        asks for it (tokenizer.ggml.add_bos_token) and the rendered text does not already start
        with it. transformers' apply_chat_template never adds one, so the two differ only for a
        template without {{ bos_token }} in a tokenizer that adds BOS.
        """
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.chat_template()
        if template is None:
            raise BadInput("this bundle's GGUF has no chat template", "Prompt it with raw text (--raw)")
        bos, eos = self._lib.llama_vocab_bos(self._vocab), self._lib.llama_vocab_eos(self._vocab)
        formatter = Jinja2ChatFormatter(
            template=template,
            bos_token=self._token_text(bos),
            eos_token=self._token_text(eos),
            add_generation_prompt=add_generation_prompt,
        )
        text = formatter(messages=cast(Any, messages)).prompt
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if bos >= 0 and self._lib.llama_vocab_get_add_bos(self._vocab) and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    # generation --------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        """Greedy decoding: argmax over the logits, no sampler chain, so no penalties or
        temperature can creep in. The end-of-generation token (EOS, <|end|>, <|im_end|>, ...)
        ends the run and is not part of token_ids or text (as in the ONNX session). text is the concatenation of what
        on_text received; it keeps the leading space of the first piece, as llama.cpp streams it."""
        import numpy as np

        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise BadInput("the prompt has no tokens", "Pass a non-empty prompt")
        if len(prompt) + max_tokens > self.context:
            raise BadInput(
                f"{len(prompt)} prompt tokens + {max_tokens} new tokens exceed the context of {self.context}",
                "Shorten the prompt or lower --max-tokens",
            )
        llm, lib = self._llm, self._lib
        stream = self.text_stream()
        out: list[int] = []
        pieces: list[str] = []
        stopped_by = "max_tokens"

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_text:
                    on_text(text)

        llm.reset()
        llm.eval(prompt)
        for i in range(max_tokens):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(self._n_vocab,))
            token = int(logits.argmax())
            if lib.llama_vocab_is_eog(self._vocab, token) and not ignore_eos:
                stopped_by = "eos"
                break
            out.append(token)
            emit(stream.feed(token))
            if i + 1 < max_tokens:  # the last token needs no forward pass
                llm.eval([token])
        emit(stream.flush())
        return Generation(token_ids=tuple(out), text="".join(pieces), prompt_tokens=len(prompt), stopped_by=stopped_by)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [len(ids), n_vocab] for every position, one forward pass per
        n_batch chunk. Uses llama.cpp's batch API directly: Llama(logits_all=True) would
        allocate n_ctx x n_vocab floats for every session, not only for parity runs."""
        import numpy as np

        lib, ctx = self._lib, self._llm.ctx
        ids = [int(t) for t in ids]
        if len(ids) > self.context:
            raise BadInput(f"{len(ids)} tokens exceed the context of {self.context}", "Use a shorter evaluation window")
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        self._llm.reset()
        n_batch = max(1, int(lib.llama_n_batch(ctx)))
        out = np.empty((len(ids), self._n_vocab), dtype=np.float32)
        for start in range(0, len(ids), n_batch):
            chunk = ids[start : start + n_batch]
            self._decode(chunk, start, every_row=True)
            rows = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(len(chunk) * self._n_vocab,))
            out[start : start + len(chunk)] = rows.reshape(len(chunk), self._n_vocab)
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        return out

    def stepwise_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
        """Logits the way an application meets them: the prompt in one batch, then the
        continuation one token at a time. Rows: the prompt's last position, then one per
        continuation token but the last ([len(continuation), n_vocab]).

        The context is sized to the whole sequence, as `llama-cli -c N` would be. That choice
        is what picks LongRoPE's factors in llama.cpp (long at every position once n_ctx
        exceeds the original context), so a larger session is opened for it when needed."""
        import numpy as np

        needed = len(prompt_ids) + len(continuation)
        if needed > self.context:
            with LlamaCppSession(self._model_path, self._threads, needed) as wide:
                return wide.stepwise_logits(prompt_ids, continuation)
        lib, ctx = self._lib, self._llm.ctx
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        self._llm.reset()
        rows = np.empty((len(continuation), self._n_vocab), dtype=np.float32)
        tokens = [int(t) for t in prompt_ids]
        n_batch = max(1, int(lib.llama_n_batch(ctx)))
        for start in range(0, len(tokens), n_batch):  # the prompt, logits for its last token only
            chunk = tokens[start : start + n_batch]
            self._decode(chunk, start, last_row=start + len(chunk) == len(tokens))
        rows[0] = self._last_logits()
        for i, tok in enumerate(continuation[:-1]):
            self._decode([int(tok)], len(tokens) + i, last_row=True)
            rows[i + 1] = self._last_logits()
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        return rows

    def _decode(self, chunk: Sequence[int], start: int, *, every_row: bool = False, last_row: bool = False) -> None:
        """One llama_decode of `chunk` at positions start..; logits kept for every row, the
        last one only, or none (a prompt chunk that is not the last)."""
        lib = self._lib
        batch = lib.llama_batch_init(len(chunk), 0, 1)
        try:
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = every_row or (last_row and i == len(chunk) - 1)
            batch.n_tokens = len(chunk)
            if lib.llama_decode(self._llm.ctx, batch) != 0:
                raise ToolFailed("llama_decode failed while computing logits")
        finally:
            lib.llama_batch_free(batch)

    def _last_logits(self) -> np.ndarray:
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self) -> LlamaCppSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # benchmarking ------------------------------------------------------------------------

    @classmethod
    def open_offloaded(cls, model_path: Path, threads: int | None, context: int, gpu_layers: int) -> LlamaCppSession:
        """A session with `gpu_layers` layers on the GPU (-1: all), for device profiles such as
        m-series (Metal). With gpu_layers=0 this is the plain constructor."""
        return cls(model_path, threads=threads, context=context, gpu_layers=gpu_layers)

    def timed_generate(
        self,
        prompt_ids: Sequence[int],
        gen_tokens: int,
        probe: Callable[[str], None] | None = None,
        max_length: int | None = None,
    ) -> Trial:
        """One greedy generation of exactly `gen_tokens` tokens (end-of-generation tokens are
        not special here), timed as llama-bench times llama.cpp: prefill is eval(prompt), decode
        is the single-token evals; token selection (numpy argmax) is outside the timed regions.

        first_token_s is prefill plus the selection of the first token (time to first token);
        decode_s covers the n_generated - 1 forward passes that produce the tokens after it (the
        last token needs none). probe("prefill") and probe("decode") run after each phase,
        outside the timing. max_length is ignored: llama.cpp sized the KV cache (n_ctx) when
        the session opened.
        """
        import time

        import numpy as np

        prompt = [int(t) for t in prompt_ids]
        if not prompt or gen_tokens < 1:
            raise BadInput("a timed generation needs a prompt and at least one new token", "Fix the benchmark settings")
        if len(prompt) + gen_tokens > self.context:
            raise BadInput(
                f"{len(prompt)} prompt tokens + {gen_tokens} new tokens exceed the context of {self.context}",
                "Lower --prompt-tokens or --gen-tokens",
            )
        llm, lib, n_vocab = self._llm, self._lib, self._n_vocab
        clock = time.perf_counter

        def argmax() -> int:
            return int(np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

        llm.reset()
        t0 = clock()
        llm.eval(prompt)
        prefill_s = clock() - t0
        if probe:
            probe("prefill")
        t0 = clock()
        token = argmax()
        first_token_s = prefill_s + (clock() - t0)
        decode_s, n = 0.0, 1
        while n < gen_tokens:
            t0 = clock()
            llm.eval([token])
            decode_s += clock() - t0
            token = argmax()
            n += 1
        if probe:
            probe("decode")
        return Trial(prefill_s=prefill_s, first_token_s=first_token_s, decode_s=decode_s, n_generated=n)
