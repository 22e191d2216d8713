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
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import childjob
from . import host as hostmod
from .bundle import read_manifest
from .bundle_readme import update_manifest
from .checkpoint import content_hash
from .errors import BadInput
from .evalrecord import (
    FORMAT_SENSITIVITY_MAX,
    PARAPHRASE_DROP_MAX,
    REFERENCE,
    EvalRecord,
    EvalReport,
    item_results,
    make_record,
)
from .fileio import write_text
from .gates import Gate
from .paths import cache_dir
from .progress import NullProgress, Progress
from .scoring import wilson
from .tasks import TaskSet, choice_continuation, load_tasks
from .verification import reference_checkpoints

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

MIN_ITEMS = 30  # below this an accuracy interval is too wide to decide anything
CACHE_FORMAT = 1  # bump when what the reference cache stores changes
# The reference runs torch on one thread: on SmolLM2-135M one and two threads both decode about
# 22 tok/s here (per-op overhead dominates), but with two threads on a 2-core machine busy with
# other jobs the intra-op barriers waited on descheduled threads and one run of the shipped set
# took 1186 s instead of about 2 minutes. Its answers do not depend on the thread count.
REFERENCE_THREADS = 1


def _items_job(tasks: TaskSet) -> list[dict[str, Any]]:
    return [{**t.to_job(), "continuations": [choice_continuation(t, c) for c in t.choices]} for t in tasks.tasks]


def reference_cache_path(checkpoint: Checkpoint, tasks: TaskSet, threads: int) -> Path:
    """Where the reference's answers for these items are cached: keyed by the checkpoint's
    content, the items as sent, the threads and the transformers / torch versions."""
    key_src = json.dumps(
        {
            "v": CACHE_FORMAT,
            "ckpt": content_hash(checkpoint.path),
            "items": _items_job(tasks),
            "threads": threads,
            "versions": [version(p) for p in ("transformers", "torch")],
        },
        sort_keys=True,
    )
    return cache_dir() / "eval-reference" / f"{hashlib.sha256(key_src.encode()).hexdigest()[:32]}.json"


def _reference_child(
    checkpoint: Checkpoint, tasks: TaskSet, threads: int, progress: Progress
) -> tuple[dict[str, Any], bool]:
    """The reference's child result, from the cache when the checkpoint, the items and the
    library versions are the same (its timings are then those of the run that filled it)."""
    items = _items_job(tasks)
    path = reference_cache_path(checkpoint, tasks, threads)
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")), True
        except ValueError:
            pass  # a damaged cache entry is recomputed
    job = {
        "mode": REFERENCE,
        "checkpoint": str(checkpoint.path),
        "trust_remote_code": checkpoint.trust_remote_code,
        "threads": threads,
        "items": items,
    }
    with progress.step(f"eval reference ({checkpoint.short_name}, transformers)", total=1 + len(items)) as step:
        child, _ = childjob.run(
            "edgekit.eval_child",
            job,
            f"the eval reference process for {checkpoint.path}",
            "@edgekit-eval",
            on_mark=lambda m: step.advance(),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(child))
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


def evaluate(
    bundles: Sequence[str | Path],
    tasks: TaskSet,
    *,
    references: dict[str, Any] | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    output: str | Path | None = None,
    write_manifest: bool = True,
    paraphrase_max: float = PARAPHRASE_DROP_MAX,
    format_max: float = FORMAT_SENSITIVITY_MAX,
    progress: Progress | None = None,
) -> EvalReport:
    """See evaluate_bundles. `references` maps a checkpoint content sha256 to the resolved
    checkpoint whose transformers run is the baseline row for bundles made from it."""
    # edgekit.bench is also the benchmark child's __main__; loaded here, not by the package.
    from .bench import choose_profile, plan

    progress = progress or NullProgress()
    for name, v in (("--max-paraphrase-drop", paraphrase_max), ("--max-format-sensitivity", format_max)):
        if not 0 <= v <= 1:
            raise BadInput(f"{name} must be between 0 and 1, got {v}", "Pass a fraction, e.g. 0.1")
    out = _check_output(output)
    host = hostmod.facts()
    prof, source, why = choose_profile(profile, overrides, host)
    skipped: list[str] = []
    need = max(t.max_tokens for t in tasks.tasks) + 1
    runs = plan(
        bundles, prof, source, host, reps=1, warmup=0, prompt_tokens=1, gen_tokens=max(2, need - 1), notes=skipped
    )
    warnings = []
    if len(tasks.tasks) < MIN_ITEMS:
        warnings.append(
            f"only {len(tasks.tasks)} items: the 95 % interval is wide (±{_half_width(len(tasks.tasks)):.2f} "
            f"at 50 % accuracy); use at least {MIN_ITEMS}"
        )
    if source == "detected":
        progress.note(f"profile: {prof.name} ({why}; pass --profile to choose)")
    for line in skipped:
        progress.note(line)
    ref_records: dict[str, EvalRecord] = {}
    for sha, ck in (references or {}).items():
        child, cached = _reference_child(ck, tasks, REFERENCE_THREADS, progress)
        ref_records[sha] = make_record(
            name=REFERENCE,
            kind=REFERENCE,
            fmt="transformers",
            model=ck.short_name,
            tasks=tasks,
            items=item_results(tasks, child["items"]),
            child=child,
            reference=None,
            size_bytes=None,
            threads=REFERENCE_THREADS,
            profile=prof.name,
            host_id=host.host_id,
            paraphrase_max=paraphrase_max,
            format_max=format_max,
            cached=cached,
        )
    records = []
    job_items = _items_job(tasks)
    for run in runs:
        manifest = read_manifest(Path(run.bundle))
        with progress.step(f"eval {Path(run.bundle).name}", total=1 + len(job_items)) as step:
            child, _ = childjob.run(
                "edgekit.eval_child",
                {"mode": "bundle", "run": dataclasses.asdict(run), "items": job_items},
                f"the eval process for {run.bundle}",
                "@edgekit-eval",
                on_mark=lambda m: step.advance(),
            )
        for s in run.substitutions + tuple(child.get("substitutions", ())):
            progress.note(f"{run.bundle}: {s}")
        record = make_record(
            name=run.bundle,
            kind="bundle",
            fmt=run.format,
            model=run.model,
            tasks=tasks,
            items=item_results(tasks, child["items"]),
            child=child,
            reference=ref_records.get(manifest["source"].get("content_sha256")),
            size_bytes=run.bundle_bytes,
            threads=run.threads,
            profile=prof.name,
            host_id=host.host_id,
            paraphrase_max=paraphrase_max,
            format_max=format_max,
        )
        if write_manifest:
            record_in_manifest(record)
        records.append(record)
    if out is not None:
        _write_items(out, list(ref_records.values()) + records)
    return EvalReport(
        tasks=tasks.key,
        tasks_sha256=tasks.sha256,
        n_items=len(tasks.tasks),
        profile=prof.name,
        references=tuple(ref_records.values()),
        bundles=tuple(records),
        warnings=tuple(warnings),
    )


def evaluate_bundles(
    bundles: Sequence[str | Path] = (),
    *,
    tasks: str | Path | None = None,
    limit: int | None = None,
    normalization: dict[str, bool] | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    reference: bool | str = True,
    offline: bool | None = None,
    trust_remote_code: bool = False,
    output: str | Path | None = None,
    write_manifest: bool = True,
    max_paraphrase_drop: float = PARAPHRASE_DROP_MAX,
    max_format_sensitivity: float = FORMAT_SENSITIVITY_MAX,
    progress: Progress | None = None,
) -> EvalReport:
    """Run a task file (default: the shipped edgekit-basic set) on each bundle (default: every
    bundle under dist/) and on the unquantized reference in transformers, each in a fresh
    process. Returns an EvalReport: per bundle accuracy with a 95 % Wilson interval, per-match
    accuracy, delta, flips and McNemar's exact p against the reference, ECE of choice items,
    paraphrase drop and format sensitivity, TTFT / end-to-end latency p50 / p95 / max, decode
    tok/s, peak RSS and size. `reference` may be False (no baseline row) or a checkpoint path
    to use instead of the one in the manifest. Every input is checked before a model loads.
    """
    from .bench import discover_bundles  # the benchmark child's __main__: see evaluate()

    task_set = load_tasks(tasks, limit=limit, normalization=normalization)
    refs = (
        reference_checkpoints(
            bundles or discover_bundles(), reference if isinstance(reference, str) else None, offline, trust_remote_code
        )
        if reference
        else {}
    )
    return evaluate(
        bundles,
        task_set,
        references=refs,
        profile=profile,
        overrides=overrides,
        output=output,
        write_manifest=write_manifest,
        paraphrase_max=max_paraphrase_drop,
        format_max=max_format_sensitivity,
        progress=progress,
    )


def _half_width(n: int) -> float:
    lo, hi = wilson(n // 2, n)
    return (hi - lo) / 2


def _write_items(out: Path, records: Sequence[EvalRecord]) -> None:
    """One JSON line per item per bundle (and reference), replaced atomically."""
    lines = [
        json.dumps(
            {"bundle": r.name, "kind": r.kind, "format": r.format, "tasks": r.tasks, **dataclasses.asdict(item)},
            sort_keys=True,
        )
        + "\n"
        for r in records
        for item in r.items
    ]
    write_text(out, "".join(lines))


def record_in_manifest(record: EvalRecord) -> None:
    """manifest["eval"][tasks key] = the latest summary, shown in README.md too; only README's
    file entry changes, so the bundle still validates (manifest.json is not among the hashed files)."""
    section = dict(read_manifest(Path(record.name)).get("eval") or {})
    section[record.tasks] = record.summary()
    update_manifest(Path(record.name), eval=section)


def stored_record(bundle: str | Path, tasks_key: str) -> dict[str, Any] | None:
    return (read_manifest(Path(bundle)).get("eval") or {}).get(tasks_key)


def print_table(report: EvalReport) -> None:
    """A human table on stderr: the reference rows first, then each bundle."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
    table = Table(
        title=f"edgekit eval, {report.tasks}, {report.n_items} items, profile {report.profile}", title_justify="left"
    )
    cols = [
        "bundle",
        "accuracy [95% CI]",
        "Δ ref",
        "flips -/+",
        "McNemar p",
        "ECE",
        "para",
        "fmt",
        "e2e ms p50/p95",
        "TTFT p95",
        "tok/s",
        "RSS MiB",
        "MiB",
    ]
    for col in cols:
        table.add_column(col, justify="left" if col == "bundle" else "right", no_wrap=True)

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    def robust(v, limit):
        return f(v, ".2f") + (" !" if v is not None and v > limit else "")

    for r in report.references + report.bundles:
        name = f"reference ({r.model}){' cached' if r.cached else ''}" if r.kind == REFERENCE else Path(r.name).name
        table.add_row(
            name,
            f"{r.accuracy:.3f} [{r.accuracy_low:.2f}, {r.accuracy_high:.2f}]",
            f(r.accuracy_delta, "+.3f"),
            "-" if r.flips_lost is None else f"{r.flips_lost}/{r.flips_gained}",
            f(r.mcnemar_p, ".3g"),
            f(r.ece, ".3f"),
            robust(r.paraphrase_drop, r.paraphrase_drop_max),
            robust(r.format_sensitivity, r.format_sensitivity_max),
            f"{f(r.e2e_ms_p50, '.0f')}/{f(r.e2e_ms_p95, '.0f')}",
            f(r.ttft_ms_p95, ".0f"),
            f(r.decode_tok_s, ".1f"),
            f"{r.peak_rss_mb:.0f}",
            "-" if r.size_bytes is None else f"{r.size_bytes / 2**20:.1f}",
        )
    console.print(table)
    for r in report.bundles[:1] or report.references[:1]:
        console.print(
            "per match: "
            + ", ".join(f"{m.match} {m.correct}/{m.n}" for m in r.by_match)
            + f"; {r.threads} threads; latency over generation items after one warm-up, percentiles by "
            "linear interpolation; para = paraphrase drop, fmt = format sensitivity, '!' = above the threshold "
            f"({r.paraphrase_drop_max:g} / {r.format_sensitivity_max:g})",
            markup=False,
        )
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


def gates(record: EvalRecord, limits: dict[str, float | None]) -> list[Gate]:
    """One gate per limit set. A figure that cannot be computed (no reference for a drop or
    flip rate, no groups for robustness) fails its gate rather than passing unseen."""
    out = []
    for key, limit in limits.items():
        if limit is None or key not in GATE_KEYS:
            continue
        name, op = GATE_KEYS[key]
        figure = (
            -record.accuracy_delta
            if name == "accuracy_drop" and record.accuracy_delta is not None
            else getattr(record, name, None)
        )
        out.append(Gate.check("eval", f"eval.{name}", figure if figure is None else round(figure, 4), op, limit))
    return out


SUMMARY_KEYS = (
    "tasks",
    "n_items",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "reference_accuracy",
    "accuracy_delta",
    "flip_rate",
    "flips_lost",
    "flips_gained",
    "mcnemar_p",
    "ece",
    "paraphrase_drop",
    "format_sensitivity",
    "robust",
    "ttft_ms_p50",
    "ttft_ms_p95",
    "e2e_ms_p50",
    "e2e_ms_p95",
    "decode_tok_s",
    "peak_rss_mb",
    "size_bytes",
    "profile",
    "host_id",
)


def build_summary(record: EvalRecord) -> dict[str, Any]:
    """What a build's summary.json keeps per entry (select and the report read these keys)."""
    return {k: getattr(record, k) for k in SUMMARY_KEYS}
