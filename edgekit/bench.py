"""edgekit bench: prefill and decode tokens/sec, time to first token and peak RSS, per bundle x
device profile, each measured in a fresh child process.

    profile = choose_profile(name, overrides, host)      # or detect: Apple silicon -> m-series
    runs = plan(bundles, profile, ...)                   # every input checked before anything runs
    for run in runs:
        child = run_child(run)          # `python -m edgekit.bench_child JOB RESULT`: load, warm-up, reps
        record = make_record(run, child, host, bandwidth)   # medians, RSS, bandwidth utilization, budgets
        manifest["bench"][profile][host_id] = record; --output JSONL += record

The child is the only process that imports a runtime, so one model's memory never counts
against another's and the parent stays small. Inside the child every timed region covers
runtime work only: tokenization, token selection for llama.cpp, text and bookkeeping stay
outside (see the timed_generate methods of the formats' sessions).

Modules by job: edgekit.bench_plan (inputs -> checked runs), edgekit.bench_child (the child's
measurement loop), this one (the child's figures -> records, manifest, table, budget gate).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .bench_child import CHILD_MARK, open_run, run_from_job
from .bench_plan import Run, choose_profile, discover_bundles, plan
from .budgets import gates_for
from .errors import BadInput, GateFailed
from .formats import Trial

if TYPE_CHECKING:
    from .host import HostFacts
    from .progress import Progress

DEFAULT_REPS = 5
DEFAULT_WARMUP = 1


@dataclass(frozen=True)
class BenchRecord:
    """One bundle on one profile on one host. Rates are medians over `reps` trials after
    `warmup` untimed ones, each with its sample standard deviation, minimum and maximum."""

    bundle: str
    format: str
    model: str
    profile: str
    profile_source: str
    host_id: str
    load_s: float
    ttft_ms: float
    ttft_ms_stddev: float
    ttft_ms_min: float
    ttft_ms_max: float
    prefill_tok_s: float
    prefill_tok_s_stddev: float
    prefill_tok_s_min: float
    prefill_tok_s_max: float
    decode_tok_s: float
    decode_tok_s_stddev: float
    decode_tok_s_min: float
    decode_tok_s_max: float
    peak_rss_mb: float  # the child's own peak (VmHWM): interpreter + runtime + model
    rss_before_load_mb: float  # interpreter and runtime imported, nothing loaded
    rss_after_load_mb: float
    rss_after_prefill_mb: float
    rss_end_mb: float  # at the end of the last trial's decoding
    model_bytes: int
    bundle_bytes: int
    kv_bytes_per_token: int
    bytes_per_token: int  # weights + the KV cache a decode step reads, on average
    read_bandwidth_gbs: float  # this host's measured read bandwidth (10^9 bytes/s)
    bandwidth_utilization: float  # decode_tok_s x bytes_per_token / read bandwidth
    threads: int
    gpu_layers: int
    context: int
    accuracy_level: int | None
    prompt_tokens: int
    gen_tokens: int
    reps: int
    warmup: int
    passed: bool
    budget_failures: tuple[str, ...]
    substitutions: tuple[str, ...]
    notes: tuple[str, ...]
    host: dict[str, Any]
    runtime: dict[str, str]
    trials: tuple[Trial, ...] = field(repr=False)
    edgekit_version: str = __version__
    created_at: str = ""
    # Both runtimes allocate the KV cache for the whole context when the session opens
    # (llama.cpp's n_ctx, onnxruntime-genai's max_length with a shared past/present buffer),
    # so it is kv_bytes_per_token x context, whatever the prompt: `--set context=N` shows
    # the peak at the context an app will use.
    kv_cache_mb: float = 0.0
    kv_share_of_peak: float = 0.0  # kv_cache_mb / peak_rss_mb

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchRecord:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for key in ("budget_failures", "substitutions", "notes"):
            kw[key] = tuple(kw.get(key, ()))
        kw["trials"] = tuple(Trial(**t) for t in d.get("trials", ()))
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# the parent: one child per run
# --------------------------------------------------------------------------------------------


def run_child(
    run: Run, wrap: Sequence[str] = (), on_mark: Callable[[str], None] | None = None
) -> tuple[dict[str, Any], str]:
    """Run one benchmark in a fresh `python -m edgekit.bench_child` process (prefixed by `wrap`, e.g.
    /usr/bin/time -v). Returns the child's result and everything it printed (marks removed)."""
    from . import childjob
    from .measure import ChildWatch

    return childjob.run(
        "edgekit.bench_child",
        dataclasses.asdict(run),
        f"the benchmark process for {run.bundle}",
        CHILD_MARK,
        wrap=wrap,
        on_mark=on_mark,
        watch=ChildWatch,
    )


def _stats(values: Sequence[float], digits: int) -> tuple[float, float, float, float]:
    """median, sample standard deviation (0 for one value), min, max."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return tuple(round(v, digits) for v in (statistics.median(values), sd, min(values), max(values)))  # type: ignore[return-value]


def make_record(run: Run, child: dict[str, Any], host: HostFacts, bandwidth_gbs: float) -> BenchRecord:
    trials = tuple(Trial(*t) for t in child["trials"])
    ttft = _stats([t.first_token_s * 1000 for t in trials], 2)
    prefill = _stats([run.prompt_tokens / max(t.prefill_s, 1e-9) for t in trials], 2)
    decode = _stats([(t.n_generated - 1) / max(t.decode_s, 1e-9) for t in trials], 2)
    # A decode step reads every weight once and the KV cache of the positions before it;
    # on average over the run that is prompt + gen/2 positions.
    bytes_per_token = int(run.model_bytes + run.kv_bytes_per_token * (run.prompt_tokens + run.gen_tokens / 2))
    utilization = round(decode[0] * bytes_per_token / (bandwidth_gbs * 1e9), 3) if bandwidth_gbs > 0 else 0.0
    peak = round(child["peak_rss_mb"], 1)
    kv_mb = round(run.kv_bytes_per_token * run.context / 2**20, 1)
    record = BenchRecord(
        bundle=run.bundle,
        format=run.format,
        model=run.model,
        profile=run.profile,
        profile_source=run.profile_source,
        host_id=host.host_id,
        load_s=round(child["load_s"], 3),
        ttft_ms=ttft[0],
        ttft_ms_stddev=ttft[1],
        ttft_ms_min=ttft[2],
        ttft_ms_max=ttft[3],
        prefill_tok_s=prefill[0],
        prefill_tok_s_stddev=prefill[1],
        prefill_tok_s_min=prefill[2],
        prefill_tok_s_max=prefill[3],
        decode_tok_s=decode[0],
        decode_tok_s_stddev=decode[1],
        decode_tok_s_min=decode[2],
        decode_tok_s_max=decode[3],
        peak_rss_mb=peak,
        rss_before_load_mb=round(child["rss_before_load_mb"], 1),
        rss_after_load_mb=round(child["rss_after_load_mb"], 1),
        rss_after_prefill_mb=round(child["rss_after_prefill_mb"], 1),
        rss_end_mb=round(child["rss_end_mb"], 1),
        model_bytes=run.model_bytes,
        bundle_bytes=run.bundle_bytes,
        kv_bytes_per_token=run.kv_bytes_per_token,
        bytes_per_token=bytes_per_token,
        read_bandwidth_gbs=bandwidth_gbs,
        bandwidth_utilization=utilization,
        threads=run.threads,
        gpu_layers=child["gpu_layers"],
        context=run.context,
        accuracy_level=run.accuracy_level,
        prompt_tokens=run.prompt_tokens,
        gen_tokens=run.gen_tokens,
        reps=run.reps,
        warmup=run.warmup,
        passed=True,
        budget_failures=(),
        substitutions=run.substitutions + tuple(child.get("substitutions", ())),
        notes=run.notes,
        host=host.to_dict(),
        runtime=dict(child.get("runtime", {})),
        trials=trials,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        kv_cache_mb=kv_mb,
        kv_share_of_peak=round(kv_mb / peak, 3) if peak else 0.0,
    )
    limits = {
        "max_peak_rss_mb": run.max_peak_rss_mb,
        "max_bundle_mb": run.max_bundle_mb,
        "min_decode_tok_s": run.min_decode_tok_s,
    }
    failed = [g for g in gates_for(record, run.profile, limits) if not g.passed]
    return dataclasses.replace(record, passed=not failed, budget_failures=tuple(g.text() for g in failed))


def record_in_manifest(record: BenchRecord) -> None:
    """manifest["bench"][profile][host_id] = the latest record, shown in README.md too; only
    README's file entry changes, so the bundle still validates."""
    from .bundle import read_manifest
    from .bundle_readme import update_manifest

    bench = dict(read_manifest(Path(record.bundle)).get("bench") or {})
    per_profile = dict(bench.get(record.profile) or {})
    per_profile[record.host_id] = record.to_dict()
    bench[record.profile] = per_profile
    update_manifest(Path(record.bundle), bench=bench)


def _check_output(output: str | Path | None) -> Path | None:
    if output is None:
        return None
    out = Path(output)
    if out.is_dir():
        raise BadInput(f"--output {out} is a directory", "Pass a file name, e.g. results.jsonl")
    if not out.parent.is_dir():
        raise BadInput(f"--output {out}: directory {out.parent} does not exist", "Create it or choose another path")
    return out


def bench(
    bundles: Sequence[str | Path] = (),
    *,
    profile: str | None = None,
    reps: int = DEFAULT_REPS,
    warmup: int = DEFAULT_WARMUP,
    prompt_tokens: int | None = None,
    gen_tokens: int | None = None,
    overrides: dict[str, Any] | None = None,
    output: str | Path | None = None,
    write_manifest: bool = True,
    progress: Progress | None = None,
) -> list[BenchRecord]:
    """See edgekit.api.bench."""
    from . import host as hostmod
    from .progress import NullProgress

    progress = progress or NullProgress()
    if reps < 1:
        raise BadInput(f"--reps must be at least 1, got {reps}", "Pass a positive number of timed repetitions")
    if warmup < 0:
        raise BadInput(f"--warmup must be 0 or more, got {warmup}", "Pass 0 to skip the warm-up")
    out = _check_output(output)
    host = hostmod.facts()
    prof, source, why = choose_profile(profile, overrides, host)
    skipped: list[str] = []
    runs = plan(
        bundles,
        prof,
        source,
        host,
        reps=reps,
        warmup=warmup,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        notes=skipped,
    )
    # Said only once every input is known good: a bad input gets exactly one line.
    if source == "detected":
        progress.note(f"profile: {prof.name} ({why}; pass --profile to choose)")
    for line in skipped:
        progress.note(line)
    bandwidth = hostmod.read_bandwidth_gbs(host, progress=progress)
    records = []
    for run in runs:
        for s in run.substitutions:
            progress.note(f"{run.bundle}: {s}")
        with progress.step(f"bench {Path(run.bundle).name}", total=1 + run.warmup + run.reps) as step:
            child, _ = run_child(run, on_mark=lambda mark: step.advance())
        record = make_record(run, child, host, bandwidth)
        for s in child.get("substitutions", ()):
            progress.note(f"{run.bundle}: {s}")
        if write_manifest:
            record_in_manifest(record)
        if out is not None:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")
        records.append(record)
    return records


def gate(records: Iterable[BenchRecord]) -> None:
    failed = [f"{r.bundle} on {r.profile}: {'; '.join(r.budget_failures)}" for r in records if not r.passed]
    if failed:
        raise GateFailed(
            "bench budget exceeded: " + " | ".join(failed), "See the bench section of the bundle's manifest.json"
        )


def print_table(records: Sequence[BenchRecord]) -> None:
    """A human table on stderr: medians, with the spread as a relative standard deviation."""
    from rich.console import Console
    from rich.table import Table

    if not records:
        return
    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)
    r0 = records[0]

    def spread(median: float, sd: float, fmt: str) -> str:
        return f"{median:{fmt}} ±{sd / median:.0%}" if median else f"{median:{fmt}}"

    budgets = any(r.budget_failures or r.profile == "mobile-onnx" for r in records)
    table = Table(
        title=f"edgekit bench, profile {r0.profile}, host {r0.host_id} ({r0.host['cpu']})", title_justify="left"
    )
    cols = ["bundle", "load s", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MB", "KV cache MB", "BW util"]
    for col in cols + (["budget"] if budgets else []):
        table.add_column(col, justify="left" if col in ("bundle", "budget") else "right")
    for r in records:
        row = [
            Path(r.bundle).name,
            f"{r.load_s:.2f}",
            spread(r.ttft_ms, r.ttft_ms_stddev, ".1f"),
            spread(r.prefill_tok_s, r.prefill_tok_s_stddev, ".0f"),
            spread(r.decode_tok_s, r.decode_tok_s_stddev, ".1f"),
            f"{r.peak_rss_mb:.0f}",
            f"{r.kv_cache_mb:.0f} ({r.kv_share_of_peak:.0%})",
            f"{r.bandwidth_utilization:.0%}",
        ]
        if budgets:
            row.append("ok" if r.passed else "FAIL: " + "; ".join(r.budget_failures))
        table.add_row(*row)
    console.print(table)
    console.print(
        f"{r0.prompt_tokens} prompt tokens, {r0.gen_tokens} generated, context {r0.context} (the KV cache "
        f"is allocated for all of it), {r0.threads} threads; median of "
        f"{r0.reps} after {r0.warmup} warm-up (± relative stddev); read bandwidth "
        f"{r0.read_bandwidth_gbs:.1f} GB/s",
        markup=False,
    )


# Run and Trial are part of a record; choose_profile, discover_bundles and plan are the first
# half of bench(); open_run and run_from_job are the child's, which eval's child reuses.
__all__ = [
    "BenchRecord",
    "Run",
    "Trial",
    "bench",
    "choose_profile",
    "discover_bundles",
    "gate",
    "make_record",
    "open_run",
    "plan",
    "print_table",
    "record_in_manifest",
    "run_child",
    "run_from_job",
]
