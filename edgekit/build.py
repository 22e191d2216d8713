"""`edgekit build`: one config -> a matrix of verified, benchmarked, packed bundles and a report.

    config = load_config("edgekit.toml")
    for job in config.jobs() (or this shard's slice):          # model x format, one at a time
        in a child process (edgekit.buildchild; memory returns to the OS, a crash fails one
        entry, not the build):
            reuse the previous output if its inputs are unchanged, else
            pipeline.run_flow: export -> verify -> bench on each profile -> eval -> pack <id>.tar.gz
    compare with --baseline; write summary.json, summary.md, SHA256SUMS, report.html

The exit code is the worst outcome over all entries: 1 (an entry crashed) over 4 (integrity)
over 2 (bad input) over 3 (a gate failed) over 0.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from .buildconfig import REGRESSION_DEFAULTS, BuildConfig, Job, load_config
from .checkpoint import sha256_file
from .errors import BadInput, EdgekitError, ExitCode, IntegrityError
from .fileio import write_json, write_text
from .gates import Gate
from .host import facts
from .lock import output_lock
from .progress import NullProgress, Progress
from .report import render_html
from .summary import (
    REPORT,
    SUMMARY,
    SUMMARY_MD,
    SUMS,
    BuildEntry,
    BuildSummary,
    read_summary,
    render_markdown,
    try_read_summary,
)
from .tasks import load_tasks


class BuildFailed(EdgekitError):
    """The matrix finished but some entry failed; carries the worst entry's exit code."""

    def __init__(self, problem: str, fix: str | None, exit_code: int, summary: dict[str, Any]):
        super().__init__(problem, fix)
        self.exit_code = exit_code
        self.summary = summary  # written to disk already; the CLI still prints it


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise BadInput(f"--shard '{text}' is not K/N", "Write e.g. --shard 2/4 (the 2nd of 4 slices)") from None
    if not (n >= 1 and 1 <= k <= n):
        raise BadInput(f"--shard {text}: K must be between 1 and N", "Write e.g. --shard 1/2")
    return k, n


def take_shard(jobs: list[Job], shard: tuple[int, int] | None) -> list[Job]:
    """Round-robin slices of the sorted matrix: deterministic, and sizes differ by at most one."""
    if shard is None:
        return jobs
    k, n = shard
    return [j for i, j in enumerate(jobs) if i % n == k - 1]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def build(
    config: str | Path | None = None,
    *,
    out: str | Path | None = None,
    force: bool = False,
    baseline: str | Path | None = None,
    shard: str | None = None,
    offline: bool | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build every entry of the config (or one shard of it) into `out`; returns the summary.
    Raises BuildFailed with the worst exit code when any entry failed (the outputs are written first)."""
    progress = progress or NullProgress()
    sh = parse_shard(shard)  # flags first: a typo there should not wait on the config
    cfg = load_config(config)
    out = Path(out or cfg.out)
    base = read_summary(Path(baseline), "--baseline") if baseline else None
    if cfg.eval_text and not Path(cfg.eval_text).is_file():
        raise BadInput(f"eval_text {cfg.eval_text} (from {cfg.path}) does not exist", "Fix [build] eval_text")
    if cfg.eval is not None:
        load_tasks(cfg.eval.tasks, limit=cfg.eval.limit)  # a bad task file fails here, before any entry
    jobs = take_shard(cfg.jobs(), sh)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        previous = {e.id: e for e in (try_read_summary(out) or _EMPTY).entries}
        started = time.monotonic()
        entries = []
        quiet = isinstance(progress, NullProgress) or getattr(progress, "quiet", False)
        for i, job in enumerate(jobs, 1):
            progress.note(f"[{i}/{len(jobs)}] {job.id} ({_elapsed(started)} elapsed)")
            e = run_job_child(cfg, job, out, previous.get(job.id), force, offline, quiet=quiet)
            entries.append(e)
            progress.note(
                f"[{i}/{len(jobs)}] {job.id}: {e.status}{' (reused: inputs unchanged)' if e.reused else ''}"
                f"{' - ' + e.message if e.message else ''}"
            )
        summary = _summary(str(cfg.path), cfg.sha256, entries, f"{sh[0]}/{sh[1]}" if sh else None, len(cfg.jobs()))
        if base is not None:
            summary = compare_baseline(summary, base, cfg.regression)
        write_outputs(out, summary)
    _raise_worst(summary, out)
    return summary.to_dict()


_EMPTY = BuildSummary(
    config="", config_sha256="", edgekit_version="", created_at="", host={}, matrix_size=0, entries=()
)


def _elapsed(t0: float) -> str:
    s = int(time.monotonic() - t0)
    return f"{s // 60:02d}:{s % 60:02d}"


def run_job_child(
    cfg: BuildConfig, job: Job, out: Path, previous: BuildEntry | None, force: bool, offline: bool | None, quiet: bool
) -> BuildEntry:
    """One entry in a fresh interpreter; its progress goes to our stderr, its entry to a file."""
    spec = {
        "job": {
            "id": job.id,
            "format": job.format,
            "profiles": list(job.profiles),
            "model": dataclasses.asdict(job.model),
            "budgets": {p: job.budgets(cfg, p) for p in job.profiles},
        },
        "bench": {
            "reps": cfg.reps,
            "warmup": cfg.warmup,
            "prompt_tokens": cfg.prompt_tokens,
            "gen_tokens": cfg.gen_tokens,
        },
        "eval_text": cfg.eval_text,
        "config_sha256": cfg.sha256,
        "out": str(out.resolve()),
        "eval": dataclasses.asdict(cfg.eval) if cfg.eval is not None else None,
        "previous": previous.to_dict() if previous else None,
        "force": force,
        "offline": offline,
        "quiet": quiet,
    }
    with tempfile.TemporaryDirectory(prefix="edgekit-build-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "edgekit.buildchild", str(spec_path), str(result_path)], check=False
        )
        if result_path.is_file():
            return BuildEntry.from_dict(json.loads(result_path.read_text(encoding="utf-8")))
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
    if proc.returncode in (-2, ExitCode.INTERRUPTED):
        raise KeyboardInterrupt
    return BuildEntry(
        job.id,
        job.model.name,
        job.format,
        status="error",
        exit_code=ExitCode.ERROR,
        message=f"the build process for {job.id} {how} without a result (out of memory?)",
        timings={"total_s": round(time.monotonic() - t0, 1)},
    )


def _summary(config: str, config_sha: str, entries: list[BuildEntry], shard: str | None, total: int) -> BuildSummary:
    host = json.loads(json.dumps(dataclasses.asdict(facts()), default=str))
    return BuildSummary(
        config=str(config),
        config_sha256=config_sha,
        edgekit_version=__version__,
        created_at=_now(),
        host=host,
        matrix_size=total,
        entries=tuple(sorted(entries, key=lambda e: e.id)),
        shard=shard,
    )


def regression_gates(e: BuildEntry, b: BuildEntry, margins: dict[str, float]) -> list[Gate]:
    """One regression gate per figure both builds measured; speed only on the same host."""
    gates = []

    def add(name: str, new: Any, before: Any, limit: float, op: str) -> None:
        if new is not None and before is not None:
            gates.append(Gate.check("regression", name, new, op, round(limit, 6), baseline=before))

    p, q = e.parity or {}, b.parity or {}
    add("kld_mean", p.get("kld_mean"), q.get("kld_mean"), q.get("kld_mean", 0) * (1 + margins["kld_mean_rel"]), "<=")
    add(
        "top1_agreement",
        p.get("top1_agreement"),
        q.get("top1_agreement"),
        (q.get("top1_agreement") or 0) - margins["top1_agreement_abs"],
        ">=",
    )
    add("ppl_ratio", p.get("ppl_ratio"), q.get("ppl_ratio"), (q.get("ppl_ratio") or 0) + margins["ppl_ratio_abs"], "<=")
    if e.size_bytes and b.size_bytes:
        add("size_bytes", e.size_bytes, b.size_bytes, b.size_bytes * (1 + margins["size_rel"]), "<=")
    old_bench = {(r["profile"], r.get("host_id")): r for r in b.bench}
    for r in e.bench:
        o = old_bench.get((r["profile"], r.get("host_id")))
        if o is None:
            continue  # speed is only comparable on the same host
        add(
            f"{r['profile']}.decode_tok_s",
            r["decode_tok_s"],
            o["decode_tok_s"],
            o["decode_tok_s"] * (1 - margins["decode_tok_s_rel"]),
            ">=",
        )
        add(
            f"{r['profile']}.prefill_tok_s",
            r["prefill_tok_s"],
            o["prefill_tok_s"],
            o["prefill_tok_s"] * (1 - margins["prefill_tok_s_rel"]),
            ">=",
        )
        add(
            f"{r['profile']}.peak_rss_mb",
            r["peak_rss_mb"],
            o["peak_rss_mb"],
            o["peak_rss_mb"] * (1 + margins["peak_rss_rel"]),
            "<=",
        )
    return gates


def compare_baseline(summary: BuildSummary, base: BuildSummary, margins: dict[str, float]) -> BuildSummary:
    """Add a regression gate per compared figure to each entry that the baseline also has;
    an entry that regressed beyond its margin becomes gate_failed (exit 3)."""
    old = {e.id: e for e in base.entries}
    entries = []
    for e in summary.entries:
        b = old.get(e.id)
        if e.status == "error" or not b or not b.parity or not e.parity:
            entries.append(dataclasses.replace(e, baseline=None if not b else "not comparable"))
            continue
        own = [g for g in e.gates if g.kind != "regression"]
        judged = e.with_gates(own + regression_gates(e, b, margins))
        entries.append(dataclasses.replace(judged, baseline=base.created_at))
    return dataclasses.replace(
        summary, entries=tuple(entries), baseline={"created_at": base.created_at, "config_sha256": base.config_sha256}
    )


def merge(
    dirs: list[str | Path], out: str | Path, *, baseline: str | Path | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Combine shard outputs into `out`: bundles and tarballs copied in (if elsewhere), one
    summary, SHA256SUMS and report. Shards must come from the same config."""
    progress = progress or NullProgress()
    out = Path(out)
    docs = [(Path(d), read_summary(Path(d), "--merge")) for d in dirs]
    shas = {doc.config_sha256 for _, doc in docs}
    if len(shas) != 1:
        raise BadInput(
            "the shards were built from different configs (config_sha256 differs)", "Merge shards of one build only"
        )
    base = read_summary(Path(baseline), "--baseline") if baseline else None
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, BuildEntry] = {}
    with output_lock(out):
        for d, doc in docs:
            for e in doc.entries:
                if e.id in entries:
                    raise BadInput(
                        f"entry {e.id} appears in two shards ({d})", "Each shard must be a distinct K of the same N"
                    )
                if e.tarball:
                    _copy_entry(d, e, out)
                entries[e.id] = e
                progress.note(f"merged {e.id} from {d}")
        first = docs[0][1]
        summary = _summary(first.config, first.config_sha256, list(entries.values()), None, first.matrix_size)
        summary = dataclasses.replace(summary, merged_from=tuple(str(d) for d, _ in docs))
        if len(entries) != first.matrix_size:
            summary = dataclasses.replace(summary, incomplete=f"{len(entries)} of {first.matrix_size} matrix entries")
        if base is not None:
            summary = compare_baseline(summary, base, REGRESSION_DEFAULTS)
        write_outputs(out, summary)
    _raise_worst(summary, out)
    return summary.to_dict()


def _copy_entry(d: Path, e: BuildEntry, out: Path) -> None:
    if e.tarball is None:  # an entry that failed before packing has nothing to copy
        return
    src = d / e.tarball
    if not src.is_file() or sha256_file(src) != e.tarball_sha256:
        raise IntegrityError(
            f"{src} is missing or does not match its sha256 in {d / SUMMARY}", "Re-run or re-download that shard"
        )
    if d.resolve() != out.resolve():
        shutil.copyfile(src, out / e.tarball)
        if e.bundle and (d / e.bundle).is_dir():
            shutil.rmtree(out / e.bundle, ignore_errors=True)
            shutil.copytree(d / e.bundle, out / e.bundle)


def _raise_worst(summary: BuildSummary, out: Path) -> None:
    code = summary.worst_exit_code
    if code == ExitCode.OK:
        return
    bad = [e for e in summary.entries if e.exit_code != ExitCode.OK]
    listed = "; ".join(f"{e.id}: {e.message or e.status}" for e in bad[:3])
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    what = "failed a gate" if code == ExitCode.GATE_FAILED else "failed"
    raise BuildFailed(
        f"{len(bad)} of {len(summary.entries)} entries {what}: {listed}{more}",
        f"See {out / SUMMARY_MD}",
        code,
        summary.to_dict(),
    )


def write_outputs(out: Path, summary: BuildSummary) -> None:
    doc = summary.to_dict()
    write_json(out / SUMMARY, doc)
    write_text(out / SUMMARY_MD, render_markdown(doc))
    sums = "".join(f"{e['tarball_sha256']}  {e['tarball']}\n" for e in doc["entries"] if e.get("tarball"))
    write_text(out / SUMS, sums)
    write_text(out / REPORT, render_html(doc))
