"""Parity of a bundle against the unquantized reference, as a gate.

Every check is computed, each failure is collected with its figure and threshold, and the
report fails once at the end (the optimum exporters' validation pattern).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInput
from .gates import Gate
from .longcontext import LongContextReport

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .formats import Session
    from .progress import Progress
    from .reference import Reference

# Completion prompts for greedy_match_tokens: short, factual, varied.
GREEDY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
)
GREEDY_TOKENS = 24

# Strings that break tokenizers: unicode, emoji, digits, whitespace runs, code.
PROBES = (
    "Hello, world!",
    "naïve café résumé Ünïcödé ß ø å",
    "日本語のテキストと中文",
    "emoji 🙂🚀👍🏽 done",
    "digits 1234567890 3.14159 -42 1e-9",
    "tabs\tand\nnewlines\n\nend",
    "    indented    runs     of spaces",
    "def f(x):\n    return x ** 2  # square",
    '{"key": [1, 2, 3], "ok": true}',
    "https://example.com/a?b=c&d=e#frag",
)

CHAT = (
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 12 times 12?"},
    {"role": "assistant", "content": "144."},
    {"role": "user", "content": "And the square root of 144? Answer: 12 — right?"},
)


@dataclass(frozen=True)
class Thresholds:
    kld_mean_max: float = 0.10
    kld_p99_max: float | None = None
    top1_agreement_min: float = 0.80
    ppl_ratio_max: float = 1.10
    greedy_match_min: float | None = None  # mean tokens before divergence
    tokenizer_agreement_min: float = 1.0
    chat_template_match: bool = True
    # The long-context probe's gate, over the positions past the original context; unset:
    # the same limits as the short text (kld_mean_max, top1_agreement_min).
    long_context_kld_mean_max: float | None = None
    long_context_top1_min: float | None = None

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str) -> Thresholds:
        from .targets import check_keys

        check_keys(table, set(cls.__dataclass_fields__), where)
        kwargs: dict[str, Any] = {}
        for key, value in table.items():
            expected: type | tuple[type, ...] = bool if key == "chat_template_match" else (int, float)
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise BadInput(
                    f"{where}: threshold '{key}' must be a number"
                    if expected is not bool
                    else f"{where}: '{key}' must be true or false",
                    f"Fix {key}",
                )
            kwargs[key] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class ParityReport:
    bundle: str
    format: str
    reference: dict[str, Any]
    eval_text_sha256: str
    positions: int
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    ppl_ref: float
    ppl_bundle: float
    ppl_ratio: float
    delta_p_mean: float
    delta_p_p1: float
    delta_p_p99: float
    greedy_match_tokens_mean: float
    greedy_match_tokens_min: int
    greedy_tokens: int
    tokenizer_agreement: float
    tokenizer_failures: tuple[str, ...]
    chat_template_match: bool
    checks: tuple[Gate, ...]  # kind "parity": one per threshold set
    passed: bool
    wall_s: float
    peak_rss_mb: float
    failed: tuple[str, ...] = field(default=())
    long_context: LongContextReport | None = None  # None: the probe did not run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> dict[str, Any]:
        keys = (
            "kld_mean",
            "kld_p99",
            "top1_agreement",
            "ppl_ratio",
            "greedy_match_tokens_mean",
            "tokenizer_agreement",
            "chat_template_match",
            "passed",
            "failed",
        )
        out = {k: getattr(self, k) for k in keys}
        if self.long_context is not None:
            lc = self.long_context
            out["long_context"] = {
                "parity_context": lc.parity_context,
                "boundary": lc.boundary,
                "kld_mean_after": lc.kld_mean_after,
                "top1_after": lc.top1_after,
                "limit": lc.limit,
                "passed": lc.passed,
            }
        return out


def evaluate_checks(metrics: dict[str, Any], t: Thresholds) -> list[Gate]:
    """One parity gate per threshold the target sets (a None threshold is not checked)."""
    limits = (
        ("kld_mean", t.kld_mean_max, "<="),
        ("kld_p99", t.kld_p99_max, "<="),
        ("top1_agreement", t.top1_agreement_min, ">="),
        ("ppl_ratio", t.ppl_ratio_max, "<="),
        ("greedy_match_tokens_mean", t.greedy_match_min, ">="),
        ("tokenizer_agreement", t.tokenizer_agreement_min, ">="),
        ("chat_template_match", True if t.chat_template_match else None, "=="),
    )
    return [Gate.check("parity", name, metrics[name], op, limit) for name, limit, op in limits if limit is not None]


def teacher_forced(session: Session, reference: Reference, rows_per_chunk: int = 64) -> dict[str, float]:
    """Metrics over every window; only one window of logits (plus a row chunk in float64)
    is in memory at a time."""
    import numpy as np

    from .metrics import concat, position_stats, summarise

    stats = []
    for i, window in enumerate(reference.windows):
        ref = reference.logits(i)
        bun = session.logits(list(window))
        targets = np.asarray(window[1:])
        for r in range(0, len(targets), rows_per_chunk):
            sl = slice(r, min(r + rows_per_chunk, len(targets)))
            stats.append(position_stats(np.asarray(ref[sl]), bun[sl], targets[sl]))
        del bun, ref
    return summarise(concat(stats))


def greedy_agreement(session: Session, reference: Reference) -> tuple[float, int]:
    """Tokens the bundle's greedy continuation shares with the reference's before diverging.
    Identical continuations (also when both stop at EOS early) count as a full match."""
    from .metrics import greedy_match

    matches = []
    for prompt, ref_ids in reference.greedy.items():
        ids = reference.prompt_ids[prompt]
        got = list(session.generate(ids, GREEDY_TOKENS).token_ids)
        matches.append(GREEDY_TOKENS if got == ref_ids else greedy_match(ref_ids, got))
    return (sum(matches) / len(matches), min(matches)) if matches else (float(GREEDY_TOKENS), GREEDY_TOKENS)


def probe_strings(tokenizer: Any) -> list[str]:
    specials = [
        t
        for t in dict.fromkeys(
            tokenizer.all_special_tokens
            + list(tokenizer.added_tokens_decoder and [a.content for a in tokenizer.added_tokens_decoder.values()])
        )
        if t
    ]
    return list(PROBES) + [f"{s}Hello there{s}\n" for s in specials[:8]]


def tokenizer_agreement(session: Session, tokenizer: Any) -> tuple[float, list[str]]:
    """Share of probes the runtime tokenizer encodes to the reference's exact ids and decodes
    back to the reference's text."""
    failures = []
    probes = probe_strings(tokenizer)
    for s in probes:
        want = tokenizer(s, add_special_tokens=False).input_ids
        got = session.encode(s)
        if got != want:
            failures.append(f"encode {s!r}: {got[:12]} != {want[:12]}")
            continue
        ref_text = tokenizer.decode(want, skip_special_tokens=True)
        out = session.decode(got)
        if out.strip() != ref_text.strip():
            failures.append(f"decode {s!r}: {out!r} != {ref_text!r}")
    return 1.0 - len(failures) / len(probes), failures


def chat_match(session: Session, tokenizer: Any) -> bool:
    want = list(tokenizer.apply_chat_template(list(CHAT), add_generation_prompt=True, tokenize=True))
    return session.chat_prompt_ids(list(CHAT)) == want


def long_context_probe(
    session: Session,
    fmt: str,
    checkpoint: Checkpoint,
    tokenizer: Any,
    text: str,
    thresholds: Thresholds,
    boundary: int,
    progress: Progress,
) -> tuple[LongContextReport, list[Gate]]:
    """Past the original context, teacher-forced as an application runs it (edgekit.longcontext)."""
    import numpy as np

    from .formats import backend
    from .longcontext import ProbePlan, parity_context
    from .metrics import position_stats
    from .reference import long_reference, probe_ids

    plan = ProbePlan.at(boundary)
    ids = probe_ids(tokenizer, text, plan.total_tokens)
    ref = long_reference(checkpoint, ids, plan.prompt_tokens, plan.boundary, progress)
    with progress.step(f"bundle logits across token {boundary}", total=None):
        got = session.stepwise_logits(ids[: plan.prompt_tokens], ids[plan.prompt_tokens :])
    n = len(got)
    first = plan.prompt_tokens - 1  # position of the first compared row
    stats = position_stats(np.asarray(ref[:n]), got, np.asarray(ids[plan.prompt_tokens : plan.prompt_tokens + n]))
    after = np.arange(first, first + n) >= boundary
    kld_max = (
        thresholds.long_context_kld_mean_max
        if thresholds.long_context_kld_mean_max is not None
        else thresholds.kld_mean_max
    )
    top1_min = (
        thresholds.long_context_top1_min
        if thresholds.long_context_top1_min is not None
        else thresholds.top1_agreement_min
    )
    bundle_context = getattr(session, "context_length", None)
    if bundle_context is not None and bundle_context >= plan.total_tokens:
        bundle_context = None  # no limit the probe ran into
    # Gated: the positions past the boundary, where nothing else looks; if the bundle stops
    # before it, the positions it can run.
    gated = after if after.any() else np.ones(n, dtype=bool)
    kld_gated = float(stats.kld[gated].mean())
    top1_gated = float(stats.top1_same[gated].mean())
    checks = [
        Gate.check("parity", "long_context_kld_mean", kld_gated, "<=", kld_max),
        Gate.check("parity", "long_context_top1", top1_gated, ">=", top1_min),
    ]
    if after.any():
        reach = parity_context(stats.kld[after], boundary, kld_max)
    else:
        reach = parity_context(stats.kld, first, kld_max)
    limits = getattr(backend(fmt), "LONG_CONTEXT_LIMITS", {})
    kld_before = float(stats.kld[~after].mean()) if (~after).any() else 0.0
    limit = None
    if after.any() and reach < first + n:
        limit = limits.get("after")
    elif not after.any() and bundle_context is not None:
        limit = limits.get("context", "the bundle's context ends at {context} tokens")
    elif kld_before > kld_max:
        limit = limits.get("before")
    if limit:
        limit = limit.format(boundary=boundary, context=bundle_context, reach=reach)
    report = LongContextReport(
        boundary=boundary,
        prompt_tokens=plan.prompt_tokens,
        total_tokens=plan.total_tokens,
        positions=n,
        positions_after=int(after.sum()),
        kld_mean=float(stats.kld.mean()),
        top1_agreement=float(stats.top1_same.mean()),
        kld_mean_before=kld_before,
        kld_mean_after=float(stats.kld[after].mean()) if after.any() else None,
        top1_after=float(stats.top1_same[after].mean()) if after.any() else None,
        parity_context=min(reach, bundle_context) if bundle_context else reach,
        bundle_context=bundle_context,
        limit=limit,
        passed=all(c.passed for c in checks),
    )
    return report, checks


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def long_context_boundary(checkpoint: Checkpoint, long_context: bool | None) -> int | None:
    """Where the probe crosses, or None when it does not run: by default (None) only for
    configs whose RoPE changes past an original context; True probes any model at 4096
    tokens (or half its context), False never."""
    from .longcontext import boundary_of, forced_boundary

    if long_context is False:
        return None
    found = boundary_of(checkpoint.config)
    if found is None and long_context:
        found = forced_boundary(checkpoint.config)
        if found is None:
            raise BadInput("--long-context: the model's context is too short for the probe", "Drop --long-context")
    return found


def verify_session(
    session: Session,
    bundle: Path,
    fmt: str,
    checkpoint: Checkpoint,
    text: str,
    thresholds: Thresholds,
    window: int,
    progress: Progress,
    long_context: bool | None = None,
) -> ParityReport:
    from .formats import backend
    from .hftokenizer import load_tokenizer
    from .measure import PeakRSS
    from .reference import build_reference, reference_info

    t0 = time.perf_counter()
    with PeakRSS() as usage:
        reference = build_reference(checkpoint, text, GREEDY_PROMPTS, GREEDY_TOKENS, window=window, progress=progress)
        tokenizer = load_tokenizer(checkpoint.path, checkpoint.trust_remote_code)
        with progress.step("bundle logits", total=None):
            metrics = teacher_forced(session, reference)
        with progress.step("greedy, tokenizer, chat"):
            g_mean, g_min = greedy_agreement(session, reference)
            tok_share, tok_failures = tokenizer_agreement(session, tokenizer)
            chat_ok = chat_match(session, tokenizer)
        boundary = long_context_boundary(checkpoint, long_context)
        long_report, long_checks = (
            long_context_probe(session, fmt, checkpoint, tokenizer, text, thresholds, boundary, progress)
            if boundary
            else (None, [])
        )
    metrics.update(greedy_match_tokens_mean=g_mean, tokenizer_agreement=tok_share, chat_template_match=chat_ok)
    checks = evaluate_checks(metrics, thresholds) + long_checks
    failed = tuple(c.text() for c in checks if not c.passed)
    short_failed = any(c.name in ("kld_mean", "top1_agreement", "ppl_ratio") and not c.passed for c in checks)
    known = getattr(backend(fmt), "KNOWN_DIFFERENCES", {}).get(checkpoint.architecture)
    if known and short_failed:
        failed += (f"known runtime difference: {known}",)
    elif long_report is not None and long_report.limit and not long_report.passed and not short_failed:
        # Only when the bundle matches on the short text: otherwise the limit is not the reason.
        failed += (f"long context: {long_report.limit}",)
    return ParityReport(
        bundle=str(bundle),
        format=fmt,
        reference=reference_info(reference),
        eval_text_sha256=text_sha256(text),
        positions=int(metrics["positions"]),
        kld_mean=metrics["kld_mean"],
        kld_p99=metrics["kld_p99"],
        kld_max=metrics["kld_max"],
        top1_agreement=metrics["top1_agreement"],
        ppl_ref=metrics["ppl_ref"],
        ppl_bundle=metrics["ppl_bundle"],
        ppl_ratio=metrics["ppl_ratio"],
        delta_p_mean=metrics["delta_p_mean"],
        delta_p_p1=metrics["delta_p_p1"],
        delta_p_p99=metrics["delta_p_p99"],
        greedy_match_tokens_mean=g_mean,
        greedy_match_tokens_min=g_min,
        greedy_tokens=GREEDY_TOKENS,
        tokenizer_agreement=tok_share,
        tokenizer_failures=tuple(tok_failures),
        chat_template_match=chat_ok,
        checks=tuple(checks),
        passed=not failed,
        failed=failed,
        wall_s=round(time.perf_counter() - t0, 2),
        peak_rss_mb=round(usage.peak_rss_mb, 1),
        long_context=long_report,
    )


def write_report(bundle: Path, report: ParityReport) -> None:
    """parity.json into the bundle, its summary into manifest.json and README.md, file list re-hashed."""
    from .bundle import read_manifest, write_manifest
    from .bundle_readme import write_readme

    tmp = bundle / "parity.json.tmp"
    tmp.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(bundle / "parity.json")
    manifest = read_manifest(bundle)
    manifest["parity"] = report.summary()
    write_manifest(bundle, write_readme(bundle, manifest))
