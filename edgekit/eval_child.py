"""The child side of `edgekit eval`: `python -m edgekit.eval_child JOB RESULT`.

One process per bundle (opened as bench opens it: the profile's threads and context) or for
the reference (the unquantized checkpoint in transformers, fp32 on CPU). Both run the same
items in the same order through the same loop; only the adapter differs:

    prompt ids    bundle: chat_prompt_ids(messages) (its own template and tokenizer) | encode(prompt)
                  reference: tokenizer.apply_chat_template(...) | tokenizer(prompt, no special tokens)
    generation    greedy, the item's max_tokens, the model's own stop tokens
    choice        summed log-likelihood of each choice continuation from teacher-forced logits

Timing: one untimed warm-up (the first generation item, and the first choice item), then per
item: e2e from the call into the runtime to its return (prompt ids are made before), TTFT to
the first streamed text piece (an answer that is only a stop token: TTFT = e2e).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .bench import open_run, run_from_job
from .childjob import emit_mark
from .childjob import main as child_main
from .host import peak_rss_mb
from .scoring import continuation_logprob

if TYPE_CHECKING:
    import numpy as np

CHILD_MARK = "@edgekit-eval"


class _BundleAdapter:
    def __init__(self, run_job: dict[str, Any]):
        run = run_from_job(run_job)
        self.session, _, info = open_run(run)
        self.info = {
            "load_s": info["load_s"],
            "runtime": info.get("runtime", {}),
            "substitutions": info.get("substitutions", []),
        }

    def prompt_ids(self, item: dict[str, Any]) -> list[int]:
        if item["kind"] == "chat":
            return list(self.session.chat_prompt_ids(item["messages"]))
        return list(self.session.encode(item["prompt"]))

    def encode(self, text: str) -> list[int]:
        return list(self.session.encode(text))

    def generate(self, ids: list[int], max_tokens: int, on_text: Callable[[str], None]) -> tuple[list[int], str, str]:
        gen = self.session.generate(ids, max_tokens, on_text=on_text)
        return list(gen.token_ids), gen.text, gen.stopped_by

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.session.logits(ids)

    def close(self) -> None:
        self.session.close()


class _ReferenceAdapter:
    """transformers, fp32 on CPU, the way a transformers user would call it (generate())."""

    def __init__(self, job: dict[str, Any]):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        from .hftokenizer import load_tokenizer

        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(job["checkpoint"], job["trust_remote_code"])
        # eager attention, as the parity reference: sdpa skips Gemma 2's logit soft-capping.
        self.model = AutoModelForCausalLM.from_pretrained(
            job["checkpoint"],
            dtype=torch.float32,
            attn_implementation="eager",
            trust_remote_code=job["trust_remote_code"],
        ).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.torch = torch
        self.info = {
            "load_s": time.perf_counter() - t0,
            "substitutions": [],
            "runtime": {"transformers": transformers.__version__, "torch": torch.__version__},
        }

    def prompt_ids(self, item: dict[str, Any]) -> list[int]:
        if item["kind"] == "chat":
            return list(self.tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True))
        return self.encode(item["prompt"])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def generate(self, ids: list[int], max_tokens: int, on_text: Callable[[str], None]) -> tuple[list[int], str, str]:
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch

        class _First(BaseStreamer):
            calls = 0

            def put(self, value):  # first call: the prompt; second: the first new token
                _First.calls += 1
                if _First.calls == 2:
                    on_text("")

            def end(self):
                pass

        inp = torch.tensor([ids])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        with torch.inference_mode():
            out = self.model.generate(
                inp,
                attention_mask=torch.ones_like(inp),
                max_new_tokens=max_tokens,
                do_sample=False,
                num_beams=1,
                repetition_penalty=1.0,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
                streamer=_First(),
            )
        new = [int(t) for t in out[0, len(ids) :]]
        stopped = "max_tokens"
        if new and new[-1] in self.eos:
            new, stopped = new[:-1], "eos"
        return new, self.tokenizer.decode(new, skip_special_tokens=True), stopped

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids])).logits[0].float().numpy()

    def close(self) -> None:
        self.model = None


def _choice(
    adapter: _BundleAdapter | _ReferenceAdapter, ids: list[int], continuations: Sequence[str]
) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    scores = []
    for text in continuations:
        full = ids + adapter.encode(text)
        scores.append(continuation_logprob(adapter.logits(full), full, len(ids)))
    return scores, time.perf_counter() - t0


def _generate(adapter: _BundleAdapter | _ReferenceAdapter, ids: list[int], max_tokens: int) -> dict[str, Any]:
    clock = time.perf_counter
    first: list[float] = []

    def on_text(piece: str) -> None:
        if not first:
            first.append(clock())

    t0 = clock()
    tokens, text, stopped = adapter.generate(ids, max_tokens, on_text)
    t1 = clock()
    return {
        "answer": text,
        "token_ids": tokens,
        "stopped_by": stopped,
        "ttft_s": (first[0] if first else t1) - t0,
        "e2e_s": t1 - t0,
    }


def run_items(
    adapter: _BundleAdapter | _ReferenceAdapter,
    items: Sequence[dict[str, Any]],
    warmup: bool = True,
    on_item: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    prompts = [adapter.prompt_ids(item) for item in items]  # tokenization: outside every timed region
    if warmup:
        gen = next((i for i, item in enumerate(items) if item["match"] != "choice"), None)
        if gen is not None:
            _generate(adapter, prompts[gen], items[gen]["max_tokens"])
        mc = next((i for i, item in enumerate(items) if item["match"] == "choice"), None)
        if mc is not None:
            _choice(adapter, prompts[mc], items[mc]["continuations"][:1])
    out = []
    for item, ids in zip(items, prompts):
        if item["match"] == "choice":
            scores, took = _choice(adapter, ids, item["continuations"])
            out.append({"id": item["id"], "prompt_ids": ids, "choice_logprobs": scores, "e2e_s": took})
        else:
            out.append({"id": item["id"], "prompt_ids": ids, **_generate(adapter, ids, item["max_tokens"])})
        if on_item:
            on_item(item["id"])
    return out


def work(job: dict[str, Any]) -> dict[str, Any]:
    adapter = _ReferenceAdapter(job) if job["mode"] == "reference" else _BundleAdapter(job["run"])
    emit_mark(CHILD_MARK, "load")
    try:
        items = run_items(adapter, job["items"], job.get("warmup", True), lambda i: emit_mark(CHILD_MARK, i))
    finally:
        adapter.close()
    return {**adapter.info, "items": items, "peak_rss_mb": peak_rss_mb()}


def main(argv: Sequence[str]) -> int:
    return child_main(argv, work, lambda job: job.get("run", {}).get("bundle") or job.get("checkpoint", "?"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
