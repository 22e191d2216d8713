"""edgekit eval: the user's task on every bundle and on the unquantized reference.

    tasks = load_tasks(file)                       # checked before any model loads
    runs = bench.plan(bundles, profile, ...)       # bundles validated; threads, context per profile
    reference = eval_child(checkpoint)             # transformers, cached by checkpoint + items
    for run in runs:
        child = eval_child(run)                    # a fresh process: items in file order, greedy
        record = make_record(...)                  # accuracy + Wilson, flips, McNemar, ECE, latency
        manifest["eval"][tasks.key] = summary; --output JSONL += one line per item

Every bundle gets the same items, order and settings. Latency figures cover generation items
(choice items are scored by likelihood, not generated); see edgekit.scoring for each formula.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import BadInput
from .tasks import TaskSet, choice_continuation, is_correct

MIN_ITEMS = 30            # below this an accuracy interval is too wide to decide anything
PARAPHRASE_DROP_MAX = 0.10
FORMAT_SENSITIVITY_MAX = 0.05
CACHE_FORMAT = 1          # bump when what the reference cache stores changes
REFERENCE = "reference"


@dataclass(frozen=True)
class ItemResult:
    id: str
    group: str | None
    format: str
    prompt_ids: tuple[int, ...]
    answer: str                        # generated text, or the chosen choice
    correct: bool
    e2e_ms: float                      # generation, or scoring every choice
    ttft_ms: float | None = None       # generation items only
    generated_tokens: int = 0
    stopped_by: str = "choice"         # "eos" | "max_tokens" | "choice"
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

    name: str                          # the bundle path, or "reference"
    kind: str                          # "bundle" | "reference"
    format: str                        # bundle format, or "transformers"
    model: str
    tasks: str
    tasks_sha256: str
    n_items: int
    correct: int
    accuracy: float
    accuracy_low: float                # 95 % Wilson interval
    accuracy_high: float
    by_match: tuple[MatchAccuracy, ...]
    reference_accuracy: float | None
    accuracy_delta: float | None       # bundle - reference
    flips_lost: int | None             # right for the reference, wrong here
    flips_gained: int | None
    flip_rate: float | None
    mcnemar_p: float | None
    ece: float | None                  # choice items, 10 equal-width bins
    choice_items: int
    paraphrase_drop: float | None
    paraphrase_drop_max: float
    format_sensitivity: float | None
    format_sensitivity_max: float
    robust: bool                       # both figures within their thresholds (None counts as within)
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
    cached: bool = False               # reference answers and timings read from the cache
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
        return {"tasks": self.tasks, "tasks_sha256": self.tasks_sha256, "n_items": self.n_items,
                "profile": self.profile, "warnings": list(self.warnings),
                "references": [r.summary() for r in self.references], "bundles": [r.summary() for r in self.bundles]}


def _items_job(tasks: TaskSet) -> list[dict[str, Any]]:
    return [{**t.to_job(), "continuations": [choice_continuation(t, c) for c in t.choices]} for t in tasks.tasks]


def item_results(tasks: TaskSet, child_items: Sequence[dict[str, Any]]) -> list[ItemResult]:
    from .scoring import softmax

    out = []
    for task, got in zip(tasks.tasks, child_items):
        if task.match == "choice":
            probs = softmax(got["choice_logprobs"])
            best = max(range(len(probs)), key=probs.__getitem__)
            answer = task.choices[best]
            out.append(ItemResult(task.id, task.group, task.format, tuple(got["prompt_ids"]), answer,
                                  is_correct(task, answer, tasks.normalization), round(got["e2e_s"] * 1000, 2),
                                  choice_probs=tuple(round(p, 6) for p in probs)))
        else:
            out.append(ItemResult(task.id, task.group, task.format, tuple(got["prompt_ids"]), got["answer"],
                                  is_correct(task, got["answer"], tasks.normalization), round(got["e2e_s"] * 1000, 2),
                                  ttft_ms=round(got["ttft_s"] * 1000, 2), generated_tokens=len(got["token_ids"]),
                                  stopped_by=got["stopped_by"]))
    return out


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


def make_record(*, name: str, kind: str, fmt: str, model: str, tasks: TaskSet, items: Sequence[ItemResult],
                child: dict[str, Any], reference: EvalRecord | None, size_bytes: int | None, threads: int,
                profile: str, host_id: str, paraphrase_max: float = PARAPHRASE_DROP_MAX,
                format_max: float = FORMAT_SENSITIVITY_MAX, cached: bool = False) -> EvalRecord:
    from . import scoring

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
    gen = [i for i in items if i.ttft_ms is not None]
    ttft, e2e = [i.ttft_ms for i in gen], [i.e2e_ms for i in gen]
    decoding = [i for i in gen if i.generated_tokens >= 2 and i.e2e_ms > i.ttft_ms]
    decode_s = sum(i.e2e_ms - i.ttft_ms for i in decoding) / 1000
    tok_s = sum(i.generated_tokens - 1 for i in decoding) / decode_s if decode_s > 0 else None

    def pct(values, q):
        return _round(scoring.percentile(values, q), 2)

    return EvalRecord(
        name=name, kind=kind, format=fmt, model=model, tasks=tasks.key, tasks_sha256=tasks.sha256, n_items=n,
        correct=correct, accuracy=round(correct / n, 4), accuracy_low=round(lo, 4), accuracy_high=round(hi, 4),
        by_match=tuple(by_match), reference_accuracy=ref_acc, accuracy_delta=delta, flips_lost=lost,
        flips_gained=gained, flip_rate=rate, mcnemar_p=p,
        ece=_round(scoring.ece([max(i.choice_probs) for i in choice], [i.correct for i in choice])),
        choice_items=len(choice), paraphrase_drop=_round(para), paraphrase_drop_max=paraphrase_max,
        format_sensitivity=_round(fmt_sens), format_sensitivity_max=format_max,
        robust=(para is None or para <= paraphrase_max) and (fmt_sens is None or fmt_sens <= format_max),
        ttft_ms_p50=pct(ttft, 50), ttft_ms_p95=pct(ttft, 95), ttft_ms_max=pct(ttft, 100),
        e2e_ms_p50=pct(e2e, 50), e2e_ms_p95=pct(e2e, 95), e2e_ms_max=pct(e2e, 100),
        decode_tok_s=_round(tok_s, 2), peak_rss_mb=round(child["peak_rss_mb"], 1), size_bytes=size_bytes,
        load_s=round(child["load_s"], 3), threads=threads, profile=profile, host_id=host_id,
        runtime=dict(child.get("runtime", {})), cached=cached,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), items=tuple(items),
    )


def reference_cache_path(checkpoint, tasks: TaskSet, threads: int) -> Path:
    """Where the reference's answers for these items are cached: keyed by the checkpoint's
    content, the items as sent, the threads and the transformers / torch versions."""
    from importlib.metadata import version

    from .checkpoint import content_hash
    from .paths import cache_dir

    key_src = json.dumps({"v": CACHE_FORMAT, "ckpt": content_hash(checkpoint.path), "items": _items_job(tasks),
                          "threads": threads, "versions": [version(p) for p in ("transformers", "torch")]},
                         sort_keys=True)
    return cache_dir() / "eval-reference" / f"{hashlib.sha256(key_src.encode()).hexdigest()[:32]}.json"


def _reference_child(checkpoint, tasks: TaskSet, threads: int, progress) -> tuple[dict[str, Any], bool]:
    """The reference's child result, from the cache when the checkpoint, the items and the
    library versions are the same (its timings are then those of the run that filled it)."""
    from . import childjob

    items = _items_job(tasks)
    path = reference_cache_path(checkpoint, tasks, threads)
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")), True
        except ValueError:
            pass  # a damaged cache entry is recomputed
    job = {"mode": REFERENCE, "checkpoint": str(checkpoint.path), "trust_remote_code": checkpoint.trust_remote_code,
           "threads": threads, "items": items}
    with progress.step(f"eval reference ({checkpoint.short_name}, transformers)", total=1 + len(items)) as step:
        child, _ = childjob.run("edgekit.eval_child", job, f"the eval reference process for {checkpoint.path}",
                                "@edgekit-eval", on_mark=lambda m: step.advance())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{time.time_ns()}")
    tmp.write_text(json.dumps(child), encoding="utf-8")
    tmp.replace(path)
    return child, False


def _check_output(output: str | Path | None) -> Path | None:
    if output is None:
        return None
    out = Path(output)
    if out.is_dir():
        raise BadInput(f"--output {out} is a directory", "Pass a file name, e.g. items.jsonl")
    if not out.parent.is_dir():
        raise BadInput(f"--output {out}: directory {out.parent} does not exist", "Create it or choose another path")
    return out


def evaluate(bundles: Sequence[str | Path], tasks: TaskSet, *, references: dict[str, Any] | None = None,
             profile: str | None = None, overrides: dict[str, Any] | None = None,
             output: str | Path | None = None, write_manifest: bool = True,
             paraphrase_max: float = PARAPHRASE_DROP_MAX, format_max: float = FORMAT_SENSITIVITY_MAX,
             progress=None) -> EvalReport:
    """See edgekit.api.evaluate. `references` maps a checkpoint content sha256 to the resolved
    checkpoint whose transformers run is the baseline row for bundles made from it."""
    from . import childjob
    from . import host as hostmod
    from .bench import choose_profile, plan
    from .progress import NullProgress

    progress = progress or NullProgress()
    for name, v in (("--max-paraphrase-drop", paraphrase_max), ("--max-format-sensitivity", format_max)):
        if not 0 <= v <= 1:
            raise BadInput(f"{name} must be between 0 and 1, got {v}", "Pass a fraction, e.g. 0.1")
    out = _check_output(output)
    host = hostmod.facts()
    prof, source, why = choose_profile(profile, overrides, host)
    skipped: list[str] = []
    need = max(t.max_tokens for t in tasks.tasks) + 1
    runs = plan(bundles, prof, source, host, reps=1, warmup=0, prompt_tokens=1, gen_tokens=max(2, need - 1),
                notes=skipped)
    warnings = []
    if len(tasks.tasks) < MIN_ITEMS:
        warnings.append(f"only {len(tasks.tasks)} items: the 95 % interval is wide (±{_half_width(len(tasks.tasks)):.2f} "
                        f"at 50 % accuracy); use at least {MIN_ITEMS}")
    if source == "detected":
        progress.note(f"profile: {prof.name} ({why}; pass --profile to choose)")
    for line in skipped:
        progress.note(line)
    from .bundle import read_manifest

    ref_records: dict[str, EvalRecord] = {}
    for sha, ck in (references or {}).items():
        child, cached = _reference_child(ck, tasks, runs[0].threads, progress)
        ref_records[sha] = make_record(
            name=REFERENCE, kind=REFERENCE, fmt="transformers", model=ck.short_name, tasks=tasks,
            items=item_results(tasks, child["items"]), child=child, reference=None, size_bytes=None,
            threads=runs[0].threads, profile=prof.name, host_id=host.host_id, paraphrase_max=paraphrase_max,
            format_max=format_max, cached=cached)
    records = []
    job_items = _items_job(tasks)
    for run in runs:
        manifest = read_manifest(Path(run.bundle))
        with progress.step(f"eval {Path(run.bundle).name}", total=1 + len(job_items)) as step:
            child, _ = childjob.run("edgekit.eval_child", {"mode": "bundle", "run": dataclasses.asdict(run),
                                                           "items": job_items},
                                    f"the eval process for {run.bundle}", "@edgekit-eval",
                                    on_mark=lambda m: step.advance())
        for s in run.substitutions + tuple(child.get("substitutions", ())):
            progress.note(f"{run.bundle}: {s}")
        record = make_record(
            name=run.bundle, kind="bundle", fmt=run.format, model=run.model, tasks=tasks,
            items=item_results(tasks, child["items"]), child=child,
            reference=ref_records.get(manifest["source"].get("content_sha256")), size_bytes=run.bundle_bytes,
            threads=run.threads, profile=prof.name, host_id=host.host_id, paraphrase_max=paraphrase_max,
            format_max=format_max)
        if write_manifest:
            record_in_manifest(record)
        records.append(record)
    if out is not None:
        _write_items(out, list(ref_records.values()) + records)
    return EvalReport(tasks=tasks.key, tasks_sha256=tasks.sha256, n_items=len(tasks.tasks), profile=prof.name,
                      references=tuple(ref_records.values()), bundles=tuple(records), warnings=tuple(warnings))


def _half_width(n: int) -> float:
    from .scoring import wilson

    lo, hi = wilson(n // 2, n)
    return (hi - lo) / 2


def _write_items(out: Path, records: Sequence[EvalRecord]) -> None:
    """One JSON line per item per bundle (and reference), replaced atomically."""
    tmp = out.with_name(f".{out.name}.edgekit-tmp-{time.time_ns()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            for item in r.items:
                f.write(json.dumps({"bundle": r.name, "kind": r.kind, "format": r.format, "tasks": r.tasks,
                                    **dataclasses.asdict(item)}, sort_keys=True) + "\n")
    tmp.replace(out)


def record_in_manifest(record: EvalRecord) -> None:
    """manifest["eval"][tasks key] = the latest summary; the file list is untouched, so the
    bundle still validates (manifest.json is not among the hashed files)."""
    from .bundle import read_manifest, update_manifest

    section = dict(read_manifest(Path(record.name)).get("eval") or {})
    section[record.tasks] = record.summary()
    update_manifest(Path(record.name), eval=section)


def stored_record(bundle: str | Path, tasks_key: str) -> dict[str, Any] | None:
    from .bundle import read_manifest

    return (read_manifest(Path(bundle)).get("eval") or {}).get(tasks_key)


def print_table(report: EvalReport) -> None:
    """A human table on stderr: the reference rows first, then each bundle."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
    table = Table(title=f"edgekit eval, {report.tasks}, {report.n_items} items, profile {report.profile}",
                  title_justify="left")
    cols = ["bundle", "accuracy [95% CI]", "Δ ref", "flips -/+", "McNemar p", "ECE", "para", "fmt",
            "e2e ms p50/p95", "TTFT p95", "tok/s", "RSS MiB", "MiB"]
    for col in cols:
        table.add_column(col, justify="left" if col == "bundle" else "right", no_wrap=True)

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    def robust(v, limit):
        return f(v, ".2f") + (" !" if v is not None and v > limit else "")

    for r in report.references + report.bundles:
        name = f"reference ({r.model}){' cached' if r.cached else ''}" if r.kind == REFERENCE else Path(r.name).name
        table.add_row(
            name, f"{r.accuracy:.3f} [{r.accuracy_low:.2f}, {r.accuracy_high:.2f}]", f(r.accuracy_delta, "+.3f"),
            "-" if r.flips_lost is None else f"{r.flips_lost}/{r.flips_gained}", f(r.mcnemar_p, ".3g"), f(r.ece, ".3f"),
            robust(r.paraphrase_drop, r.paraphrase_drop_max), robust(r.format_sensitivity, r.format_sensitivity_max),
            f"{f(r.e2e_ms_p50, '.0f')}/{f(r.e2e_ms_p95, '.0f')}", f(r.ttft_ms_p95, ".0f"), f(r.decode_tok_s, ".1f"),
            f"{r.peak_rss_mb:.0f}", "-" if r.size_bytes is None else f"{r.size_bytes / 2**20:.1f}")
    console.print(table)
    for r in report.bundles[:1] or report.references[:1]:
        console.print("per match: " + ", ".join(f"{m.match} {m.correct}/{m.n}" for m in r.by_match)
                      + f"; {r.threads} threads; latency over generation items after one warm-up, percentiles by "
                        "linear interpolation; para = paraphrase drop, fmt = format sensitivity, '!' = above the threshold "
                        f"({r.paraphrase_drop_max:g} / {r.format_sensitivity_max:g})", markup=False)
    for w in report.warnings:
        console.print(f"warning: {w}", markup=False)


# --------------------------------------------------------------------------------------------
# gates and the build summary

GATE_KEYS = {  # [eval] key in edgekit.toml -> (record field, operator)
    "min_accuracy": ("accuracy", ">="),
    "max_accuracy_drop": ("accuracy_drop", "<="),
    "max_flip_rate": ("flip_rate", "<="),
    "max_paraphrase_drop": ("paraphrase_drop", "<="),
    "max_format_sensitivity": ("format_sensitivity", "<="),
}


def gates(record: EvalRecord, limits: dict[str, float | None]) -> list[dict[str, Any]]:
    """One gate per limit set. A figure that cannot be computed (no reference for a drop or
    flip rate, no groups for robustness) fails its gate rather than passing unseen."""
    out = []
    for key, limit in limits.items():
        if limit is None or key not in GATE_KEYS:
            continue
        name, op = GATE_KEYS[key]
        figure = -record.accuracy_delta if name == "accuracy_drop" and record.accuracy_delta is not None \
            else getattr(record, name, None)
        passed = figure is not None and (figure >= limit if op == ">=" else figure <= limit)
        out.append({"kind": "eval", "name": f"eval.{name}", "figure": figure if figure is None else round(figure, 4),
                    "op": op, "threshold": limit, "passed": passed})
    return out


SUMMARY_KEYS = ("tasks", "n_items", "accuracy", "accuracy_low", "accuracy_high", "reference_accuracy",
                "accuracy_delta", "flip_rate", "flips_lost", "flips_gained", "mcnemar_p", "ece", "paraphrase_drop",
                "format_sensitivity", "robust", "ttft_ms_p50", "ttft_ms_p95", "e2e_ms_p50", "e2e_ms_p95",
                "decode_tok_s", "peak_rss_mb", "size_bytes", "profile", "host_id")


def build_summary(record: EvalRecord) -> dict[str, Any]:
    """What a build's summary.json keeps per entry (select and the report read these keys)."""
    return {k: getattr(record, k) for k in SUMMARY_KEYS}
