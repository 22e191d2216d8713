"""Records of `edgekit eval`: one ItemResult per item, one EvalRecord per bundle or reference
(every figure computed by edgekit.scoring), one EvalReport per run. Frozen; snake_case fields."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import __version__, scoring
from .scoring import softmax
from .tasks import TaskSet, is_correct

PARAPHRASE_DROP_MAX = 0.10
FORMAT_SENSITIVITY_MAX = 0.05
REFERENCE = "reference"


@dataclass(frozen=True)
class ItemResult:
    id: str
    group: str | None
    format: str
    prompt_ids: tuple[int, ...]
    answer: str  # generated text, or the chosen choice
    correct: bool
    e2e_ms: float  # generation, or scoring every choice
    ttft_ms: float | None = None  # generation items only
    generated_tokens: int = 0
    stopped_by: str = "choice"  # "eos" | "max_tokens" | "choice"
    choice_probs: tuple[float, ...] = ()


@dataclass(frozen=True)
class MatchAccuracy:
    match: str
    n: int
    correct: int
    accuracy: float


@dataclass(frozen=True)
class EvalRecord:
    """One bundle (or the reference) on one task set. Deltas and flips are against the reference
    of the same checkpoint; they are None for the reference itself or with no reference."""

    name: str  # the bundle path, or "reference"
    kind: str  # "bundle" | "reference"
    format: str  # bundle format, or "transformers"
    model: str
    tasks: str
    tasks_sha256: str
    n_items: int
    correct: int
    accuracy: float
    accuracy_low: float  # 95 % Wilson interval
    accuracy_high: float
    by_match: tuple[MatchAccuracy, ...]
    reference_accuracy: float | None
    accuracy_delta: float | None  # bundle - reference
    flips_lost: int | None  # right for the reference, wrong here
    flips_gained: int | None
    flip_rate: float | None
    mcnemar_p: float | None
    ece: float | None  # choice items, 10 equal-width bins
    choice_items: int
    paraphrase_drop: float | None
    paraphrase_drop_max: float
    format_sensitivity: float | None
    format_sensitivity_max: float
    robust: bool  # both figures within their thresholds (None counts as within)
    ttft_ms_p50: float | None
    ttft_ms_p95: float | None
    ttft_ms_max: float | None
    e2e_ms_p50: float | None
    e2e_ms_p95: float | None
    e2e_ms_max: float | None
    decode_tok_s: float | None
    peak_rss_mb: float
    size_bytes: int | None
    load_s: float
    threads: int
    profile: str
    host_id: str
    runtime: dict[str, str]
    cached: bool = False  # reference answers and timings read from the cache
    created_at: str = ""
    edgekit_version: str = __version__
    items: tuple[ItemResult, ...] = field(default=(), repr=False)

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("items")
        return d


@dataclass(frozen=True)
class EvalReport:
    tasks: str
    tasks_sha256: str
    n_items: int
    profile: str
    references: tuple[EvalRecord, ...]
    bundles: tuple[EvalRecord, ...]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "tasks_sha256": self.tasks_sha256,
            "n_items": self.n_items,
            "profile": self.profile,
            "warnings": list(self.warnings),
            "references": [r.summary() for r in self.references],
            "bundles": [r.summary() for r in self.bundles],
        }


def item_results(tasks: TaskSet, child_items: Sequence[dict[str, Any]]) -> list[ItemResult]:
    out = []
    for task, got in zip(tasks.tasks, child_items):
        if task.match == "choice":
            probs = softmax(got["choice_logprobs"])
            best = max(range(len(probs)), key=probs.__getitem__)
            answer = task.choices[best]
            out.append(
                ItemResult(
                    task.id,
                    task.group,
                    task.format,
                    tuple(got["prompt_ids"]),
                    answer,
                    is_correct(task, answer, tasks.normalization),
                    round(got["e2e_s"] * 1000, 2),
                    choice_probs=tuple(round(p, 6) for p in probs),
                )
            )
        else:
            out.append(
                ItemResult(
                    task.id,
                    task.group,
                    task.format,
                    tuple(got["prompt_ids"]),
                    got["answer"],
                    is_correct(task, got["answer"], tasks.normalization),
                    round(got["e2e_s"] * 1000, 2),
                    ttft_ms=round(got["ttft_s"] * 1000, 2),
                    generated_tokens=len(got["token_ids"]),
                    stopped_by=got["stopped_by"],
                )
            )
    return out


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


def make_record(
    *,
    name: str,
    kind: str,
    fmt: str,
    model: str,
    tasks: TaskSet,
    items: Sequence[ItemResult],
    child: dict[str, Any],
    reference: EvalRecord | None,
    size_bytes: int | None,
    threads: int,
    profile: str,
    host_id: str,
    paraphrase_max: float = PARAPHRASE_DROP_MAX,
    format_max: float = FORMAT_SENSITIVITY_MAX,
    cached: bool = False,
) -> EvalRecord:
    tasks_by_id = {t.id: t for t in tasks.tasks}
    n = len(items)
    correct = sum(i.correct for i in items)
    lo, hi = scoring.wilson(correct, n)
    by_match = []
    for m in sorted({tasks_by_id[i.id].match for i in items}):
        sel = [i for i in items if tasks_by_id[i.id].match == m]
        k = sum(i.correct for i in sel)
        by_match.append(MatchAccuracy(m, len(sel), k, round(k / len(sel), 4)))
    delta = lost = gained = rate = p = ref_acc = None
    if reference is not None:
        fl = scoring.flips([i.correct for i in reference.items], [i.correct for i in items])
        ref_acc, delta = reference.accuracy, round(correct / n - reference.accuracy, 4)
        lost, gained, rate, p = fl.lost, fl.gained, round(fl.rate, 4), round(fl.mcnemar_p, 6)
    choice = [i for i in items if i.choice_probs]
    groups: dict[str, list[bool]] = {}
    for i in items:
        if i.group is not None:
            groups.setdefault(i.group, []).append(i.correct)
    para = scoring.paraphrase_drop(list(groups.values()))
    fmt_sens = scoring.format_sensitivity([(i.group, i.format, i.correct) for i in items if i.group is not None])
    timed = [(i, i.ttft_ms) for i in items if i.ttft_ms is not None]  # generated items: scored ones have no TTFT
    ttft, e2e = [t for _, t in timed], [i.e2e_ms for i, _ in timed]
    decoding = [(i, t) for i, t in timed if i.generated_tokens >= 2 and i.e2e_ms > t]
    decode_s = sum(i.e2e_ms - t for i, t in decoding) / 1000
    tok_s = sum(i.generated_tokens - 1 for i, _ in decoding) / decode_s if decode_s > 0 else None

    def pct(values, q):
        return _round(scoring.percentile(values, q), 2)

    return EvalRecord(
        name=name,
        kind=kind,
        format=fmt,
        model=model,
        tasks=tasks.key,
        tasks_sha256=tasks.sha256,
        n_items=n,
        correct=correct,
        accuracy=round(correct / n, 4),
        accuracy_low=round(lo, 4),
        accuracy_high=round(hi, 4),
        by_match=tuple(by_match),
        reference_accuracy=ref_acc,
        accuracy_delta=delta,
        flips_lost=lost,
        flips_gained=gained,
        flip_rate=rate,
        mcnemar_p=p,
        ece=_round(scoring.ece([max(i.choice_probs) for i in choice], [i.correct for i in choice])),
        choice_items=len(choice),
        paraphrase_drop=_round(para),
        paraphrase_drop_max=paraphrase_max,
        format_sensitivity=_round(fmt_sens),
        format_sensitivity_max=format_max,
        robust=(para is None or para <= paraphrase_max) and (fmt_sens is None or fmt_sens <= format_max),
        ttft_ms_p50=pct(ttft, 50),
        ttft_ms_p95=pct(ttft, 95),
        ttft_ms_max=pct(ttft, 100),
        e2e_ms_p50=pct(e2e, 50),
        e2e_ms_p95=pct(e2e, 95),
        e2e_ms_max=pct(e2e, 100),
        decode_tok_s=_round(tok_s, 2),
        peak_rss_mb=round(child["peak_rss_mb"], 1),
        size_bytes=size_bytes,
        load_s=round(child["load_s"], 3),
        threads=threads,
        profile=profile,
        host_id=host_id,
        runtime=dict(child.get("runtime", {})),
        cached=cached,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        items=tuple(items),
    )
