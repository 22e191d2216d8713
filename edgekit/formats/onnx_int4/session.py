"""OnnxSession: a bundle open in onnxruntime-genai."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ...errors import BadInput, ToolFailed
from .. import Generation, Trial

if TYPE_CHECKING:
    import numpy as np

def open_session(bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None) -> "OnnxSession":
    import onnxruntime_genai as og

    config = og.Config(str(bundle_dir))
    if threads:
        session_options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
    try:
        model = og.Model(config)
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises plain RuntimeError
        raise ToolFailed(f"onnxruntime-genai cannot load {bundle_dir} ({e})", "Re-export the bundle") from None
    genai = json.loads((Path(bundle_dir) / "genai_config.json").read_text(encoding="utf-8"))
    return OnnxSession(og, model, genai["model"]["context_length"])


class OnnxSession:
    """A bundle open in onnxruntime-genai, used the way a plain onnxruntime-genai user would."""

    def __init__(self, og, model, context_length: int):
        self._og = og
        self._model = model
        self._tokenizer = og.Tokenizer(model)
        self._eos = {int(t) for t in self._tokenizer.eos_token_ids}
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        # onnxruntime-genai's encode parses special tokens and adds no BOS (checked against
        # transformers: it equals tokenizer.encode(text, add_special_tokens=False)).
        return [int(t) for t in self._tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        import numpy as np

        return self._tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def chat_prompt_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # onnxruntime-genai 0.15.2 renders the template from the bundle's tokenizer_config.json
        # itself; its output is then tokenized like any text (no BOS added unless the
        # template writes one), which is what transformers' apply_chat_template does too.
        try:
            text = self._tokenizer.apply_chat_template(json.dumps(messages),
                                                       add_generation_prompt=add_generation_prompt)
        except RuntimeError as e:
            raise BadInput(f"onnxruntime-genai cannot render the bundle's chat template ({e})",
                           "Use a raw prompt, or export a checkpoint that has a chat template") from None
        return self.encode(text)

    def generate(self, prompt_ids: Sequence[int], max_tokens: int,
                 on_text: Callable[[str], None] | None = None, ignore_eos: bool = False) -> Generation:
        """Greedy. The EOS token that ends a generation is not part of token_ids or text.

        `text` is what the runtime's TokenizerStream streamed (and on_text received). It differs
        from transformers' decode only where byte-fallback tokens do not form valid UTF-8:
        the stream drops them (transformers shows U+FFFD), and og.Tokenizer.decode even cuts
        the whole string at the first one, so it is not used here.
        """
        import numpy as np

        og = self._og
        if not prompt_ids:
            raise BadInput("the prompt has no tokens", "Pass a non-empty prompt")
        length = len(prompt_ids) + max_tokens
        if length > self.context_length:
            raise BadInput(f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) exceeds the "
                           f"context length {self.context_length}", "Ask for fewer tokens")
        params = og.GeneratorParams(self._model)
        # Greedy whatever generation_config.json asked for; min_length = max_length masks the
        # EOS logits until the end, which is how ignore_eos is expressed in onnxruntime-genai.
        params.set_search_options(do_sample=False, num_beams=1, repetition_penalty=1.0, max_length=length,
                                  min_length=length if ignore_eos else 0)
        generator = og.Generator(self._model, params)
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        stream = self._tokenizer.create_stream()
        out: list[int] = []
        pieces: list[str] = []
        stopped_by = "max_tokens"
        while len(out) < max_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self._eos and not ignore_eos:
                stopped_by = "eos"
                break
            out.append(token)
            piece = stream.decode(token)
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)
            if generator.is_done():
                break
        del generator
        return Generation(token_ids=tuple(out), text="".join(pieces),
                          prompt_tokens=len(prompt_ids), stopped_by=stopped_by)

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        """Teacher-forced logits [len(ids), vocab] from one prefill: onnxruntime-genai returns
        the graph's logits for every appended position (its vocabulary may be padded)."""
        import numpy as np

        if len(ids) > self.context_length:
            raise BadInput(f"{len(ids)} tokens exceed the context length {self.context_length}",
                           "Use a shorter evaluation window")
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = self._og.Generator(self._model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
        del generator
        return logits.reshape(-1, logits.shape[-1])[-len(ids):]

    def stepwise_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int]) -> "np.ndarray":
        """Logits the way an application meets them: append_tokens(prompt), then one token at
        a time. Rows: the prompt's last position, then one per continuation token but the last.
        Stops early (fewer rows) at the bundle's context length, which the runtime enforces."""
        import numpy as np

        total = min(len(prompt_ids) + len(continuation), self.context_length)
        rows = max(0, min(len(continuation), total - len(prompt_ids) + 1))
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=total)
        generator = self._og.Generator(self._model, params)
        out: list[np.ndarray] = []
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        for i in range(rows):
            if i:
                generator.append_tokens(np.asarray([continuation[i - 1]], dtype=np.int32))
            last = np.asarray(generator.get_logits(), dtype=np.float32)
            out.append(last.reshape(-1, last.shape[-1])[-1])
        del generator
        return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)

    def close(self) -> None:
        self._tokenizer = self._model = None

    def timed_generate(self, prompt_ids: Sequence[int], gen_tokens: int,
                       probe: Callable[[str], None] | None = None,
                       max_length: int | None = None) -> Trial:
        """One greedy generation of exactly `gen_tokens` tokens: min_length = max_length masks
        EOS, so the length is forced.

        max_length (default prompt + gen_tokens) is what the generator allocates its KV cache
        for; a benchmark passes its context so the cache matches llama.cpp's n_ctx.

        prefill_s times append_tokens(prompt), one forward pass over the prompt. The first
        generate_next_token() only selects from the prefill logits: first_token_s (time to first
        token) adds it. Each later one runs the previous token forward and selects the next;
        decode_s covers those n_generated - 1 calls. Greedy selection happens inside
        generate_next_token (C++), so unlike llama.cpp's argmax it is inside the timing.
        Building the generator (KV cache allocation) and probe("prefill") / probe("decode")
        run outside the timed regions.
        """
        import numpy as np

        prompt = np.asarray(prompt_ids, dtype=np.int32)
        if not len(prompt) or gen_tokens < 1:
            raise BadInput("a timed generation needs a prompt and at least one new token", "Fix the benchmark settings")
        needed = len(prompt) + gen_tokens
        length = max_length or needed
        if needed > length or length > self.context_length:
            raise BadInput(f"{len(prompt)} prompt tokens + {gen_tokens} new tokens exceed the context length "
                           f"{min(length, self.context_length)}", "Lower --prompt-tokens or --gen-tokens")
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(do_sample=False, num_beams=1, repetition_penalty=1.0,
                                  max_length=length, min_length=length)
        generator = self._og.Generator(self._model, params)
        clock = time.perf_counter
        t0 = clock()
        generator.append_tokens(prompt)
        prefill_s = clock() - t0
        if probe:
            probe("prefill")
        t0 = clock()
        generator.generate_next_token()
        first_token_s = prefill_s + (clock() - t0)
        n = 1
        t0 = clock()
        while n < gen_tokens:
            generator.generate_next_token()
            n += 1
        decode_s = clock() - t0
        if probe:
            probe("decode")
        del generator
        return Trial(prefill_s=prefill_s, first_token_s=first_token_s, decode_s=decode_s, n_generated=n)
