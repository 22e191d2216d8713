"""`edgekit run` and `edgekit validate`: generate from a bundle, check one against its manifest."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import validate as validate_dir
from .errors import BadInput
from .tarball import extract_safely
from .verification import open_bundle


@dataclass(frozen=True)
class RunResult:
    bundle: str
    format: str
    prompt: str
    text: str
    prompt_tokens: int
    generated_tokens: int
    stopped_by: str
    ttft_ms: float
    decode_tok_s: float
    token_ids: tuple[int, ...] = field(default=(), repr=False)
    prompt_ids: tuple[int, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REFERENCE_FORMAT = "reference"  # RunResult.format of the unquantized checkpoint's answer


@dataclass(frozen=True)
class Divergence:
    """Where a bundle's greedy answer first leaves the reference's, and how close the
    reference itself was there: margin = the reference's logit for its own token minus its
    logit for the bundle's token (a difference of log-probabilities too). A margin well under
    one logit is a near-tie that a 4-bit rounding can flip without any bug."""

    step: int  # 0 = the first answer token
    reference_token: str
    bundle_token: str
    margin: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        where = "the first answer token" if self.step == 0 else f"answer token {self.step + 1}"
        return (
            f"the bundle leaves the reference at {where}: the reference prefers {self.reference_token!r} "
            f"to the bundle's {self.bundle_token!r} by {self.margin:.3f} logits"
            + (" (a near-tie: 4-bit rounding alone can flip it)" if self.margin < NEAR_TIE else "")
        )


# Logits. Along SmolLM2-135M's answer to the demo prompt, its Q4 bundles move the difference
# between the reference's top two candidates by up to 1.3 logits, median 0.16
# (benchmarks/first_token.py):
# a margin under this is a near-tie that says nothing about a bug.
NEAR_TIE = 0.5


def run(
    bundle: str | Path,
    prompt: str,
    *,
    max_tokens: int = 128,
    raw: bool = False,
    system: str | None = None,
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> RunResult:
    """Generate greedily from a bundle. The prompt goes through the model's own chat template
    unless raw=True."""
    if max_tokens < 1:
        raise BadInput(f"--max-tokens must be at least 1, got {max_tokens}", "Pass a positive number")
    if not prompt:
        raise BadInput("the prompt is empty", "Pass --prompt TEXT")
    session, manifest = open_bundle(bundle, threads=threads)
    try:
        if raw:
            ids = session.encode(prompt)
        else:
            ids = session.chat_prompt_ids(_messages(prompt, system))
        first: list[float] = []
        t0 = time.perf_counter()

        def _on_text(piece: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if on_text:
                on_text(piece)

        gen = session.generate(ids, max_tokens, on_text=_on_text)
        t1 = time.perf_counter()
    finally:
        session.close()
    ttft = ((first[0] if first else t1) - t0) * 1000
    n = len(gen.token_ids)
    decode_s = t1 - (first[0] if first else t1)
    return RunResult(
        bundle=str(bundle),
        format=manifest["format"],
        prompt=prompt,
        text=gen.text,
        prompt_tokens=len(ids),
        generated_tokens=n,
        stopped_by=gen.stopped_by,
        ttft_ms=round(ttft, 1),
        decode_tok_s=round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else 0.0,
        token_ids=tuple(gen.token_ids),
        prompt_ids=tuple(ids),
    )


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


@dataclass
class ReferenceRun:
    """The unquantized checkpoint's greedy answer, with its logits at every step (for the
    divergence note)."""

    result: RunResult
    logits: list[Any]  # one [vocab] float32 row per generated token (and the EOS step)
    tokenizer: Any
    dtype: str  # what transformers computed in: float32 unless the checkpoint's own dtype is native here
    eos_ids: frozenset[int] = frozenset()  # the tokens that end an answer (generation_config)

    def divergence(self, bundle_ids: Sequence[int], bundle_stopped_by: str = "max_tokens") -> Divergence | None:
        """The first answer position where the bundle chose another token than the reference
        (ending the answer, EOS, counts as a choice), or None when the answers agree as far
        as both go."""
        ref_ids = self.result.token_ids
        for i, row in enumerate(self.logits):
            mine = ref_ids[i] if i < len(ref_ids) else None  # None: the reference ended its answer here
            if i < len(bundle_ids):
                theirs: int | None = int(bundle_ids[i])
            elif bundle_stopped_by == "eos":
                theirs = None  # the bundle ended its answer here
            else:
                return None  # the bundle ran out of --max-tokens before it could differ
            if mine == theirs:
                if mine is None:
                    return None
                continue
            ref_tok = int(row.argmax())
            if theirs is None:
                if not self.eos_ids:
                    return None  # no end token known to score the bundle's stop by
                theirs = max(self.eos_ids, key=lambda t: float(row[t]))
            return Divergence(
                step=i,
                reference_token=self.tokenizer.decode([ref_tok]),
                bundle_token=self.tokenizer.decode([theirs]),
                margin=round(float(row[ref_tok] - row[theirs]), 4),
            )
        return None


def run_reference(
    bundle: str | Path,
    prompt: str,
    *,
    max_tokens: int = 128,
    raw: bool = False,
    system: str | None = None,
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> ReferenceRun:
    """The same prompt through the unquantized checkpoint named in the bundle's manifest, in
    transformers (float32 on this CPU unless the checkpoint's own dtype is native here, as
    `edgekit verify`'s reference), greedy with a KV cache, stopping at the model's EOS: what
    the bundle's answer should be compared with. The prompt ids come from transformers'
    apply_chat_template (or its tokenizer without special tokens with raw=True), which
    `edgekit verify` checks equal to the runtimes' own (chat_template_match)."""
    import torch

    from .bundle import read_manifest
    from .hftokenizer import load_tokenizer
    from .layerwise import resident_model
    from .reference import reference_dtype
    from .verification import reference_checkpoint

    if max_tokens < 1:
        raise BadInput(f"--max-tokens must be at least 1, got {max_tokens}", "Pass a positive number")
    if not prompt:
        raise BadInput("the prompt is empty", "Pass --prompt TEXT")
    manifest = read_manifest(Path(bundle))
    try:
        checkpoint = reference_checkpoint(manifest, None, None, False)
    except BadInput as e:
        raise BadInput(
            f"--reference: no unquantized checkpoint to run ({e.problem})",
            "Run without --reference, or keep the checkpoint the bundle was exported from",
        ) from None
    if threads:
        torch.set_num_threads(int(threads))
    tokenizer = load_tokenizer(checkpoint.path, checkpoint.trust_remote_code)
    if raw:
        ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    else:
        ids = list(tokenizer.apply_chat_template(_messages(prompt, system), add_generation_prompt=True, tokenize=True))
    dtype = reference_dtype(checkpoint)
    model = resident_model(checkpoint, dtype, "eager")
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out: list[int] = []
    rows: list[Any] = []
    shown = ""
    stopped_by = "max_tokens"
    first: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        past, inp = None, torch.tensor([ids])
        for _ in range(max_tokens):
            res = model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            row = res.logits[0, -1].float().numpy()
            rows.append(row)
            token = int(row.argmax())
            if not first:
                first.append(time.perf_counter())
            if token in eos_ids:
                stopped_by = "eos"
                break
            out.append(token)
            text = tokenizer.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back a character still split across tokens
                if on_text and text[len(shown) :]:
                    on_text(text[len(shown) :])
                shown = text
            inp = torch.tensor([[token]])
    t1 = time.perf_counter()
    del model
    text = tokenizer.decode(out, skip_special_tokens=True)
    if on_text and text[len(shown) :]:
        on_text(text[len(shown) :])
    n = len(out)
    decode_s = t1 - (first[0] if first else t1)
    result = RunResult(
        bundle=str(bundle),
        format=REFERENCE_FORMAT,
        prompt=prompt,
        text=text,
        prompt_tokens=len(ids),
        generated_tokens=n,
        stopped_by=stopped_by,
        ttft_ms=round(((first[0] if first else t1) - t0) * 1000, 1),
        decode_tok_s=round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else 0.0,
        token_ids=tuple(out),
        prompt_ids=tuple(ids),
    )
    return ReferenceRun(result, rows, tokenizer, dtype, frozenset(eos_ids))


def validate(path: str | Path) -> dict[str, Any]:
    """Check a bundle directory or a bundle tarball (.tar.gz) against its manifest: schema,
    every file's size and sha256, nothing missing or extra. A tarball's members are checked
    (no absolute paths, `..`, links or devices) before anything is extracted, into a temp dir
    that is removed afterwards. Returns the manifest; raises IntegrityError (exit 4)."""
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tempfile.TemporaryDirectory(prefix="edgekit-validate-") as tmp:
            return validate_dir(extract_safely(path, Path(tmp) / "x"))
    if path.is_file():
        raise BadInput(f"{path} is neither a bundle directory nor a .tar.gz", "Pass a bundle directory or its tarball")
    return validate_dir(path)
