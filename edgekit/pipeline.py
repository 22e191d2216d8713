"""The whole flow for one model x format, written once:

    export -> verify -> bench on each profile -> eval -> manifest -> pack

`edgekit export` runs the first two (`export()` below), `--tune` runs them for every
candidate and keeps the smallest that passes (`tune_one`), and each entry of `edgekit build`
runs all of them in a child process (`run_flow`, called by edgekit.buildchild). Every stage
owns its gate; the gates come back as one list of `Gate` records.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budgets import bench_summary, budget_gates
from .bundle import TMP_MARK, check_destination, publish, update_manifest, validate
from .checkpoint import Checkpoint, resolve
from .errors import BadInput, GateFailed
from .evaluate import build_summary, evaluate_bundles
from .evaluate import gates as eval_gates
from .exporting import (
    ExportResult,
    check_architecture,
    destinations,
    export_one,
    recipe_for,
    targets_for,
)
from .formats import default_format
from .gates import Gate
from .parity import ParityReport
from .preflight import check as preflight
from .progress import NullProgress, Progress
from .tarball import pack
from .targets import load_targets
from .verification import verify


@dataclass(frozen=True)
class VerifyOptions:
    """How the verify stage runs (None: the target file's default)."""

    eval_text: str | Path | None = None
    thresholds: dict[str, Any] | None = None  # overrides of the target's [thresholds]
    offline: bool | None = None
    long_context: bool | None = None


@dataclass(frozen=True)
class BenchOptions:
    profiles: tuple[str, ...] = ()
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)  # profile -> budget overrides
    reps: int = 5
    warmup: int = 1
    prompt_tokens: int | None = None
    gen_tokens: int | None = None


@dataclass(frozen=True)
class FlowResult:
    """What one model x format produced, stage by stage (a stage that did not run is empty)."""

    export: ExportResult
    parity: ParityReport | None
    bench: tuple[dict[str, Any], ...]
    eval: dict[str, Any] | None
    gates: tuple[Gate, ...]
    timings: dict[str, float]
    manifest: dict[str, Any] | None = None
    tarball_sha256: str | None = None


def export(
    model: str,
    target: str | None = None,
    out: str | Path | None = None,
    *,
    verify: bool = True,
    force: bool = False,
    revision: str | None = None,
    offline: bool | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    recipe: dict[str, Any] | None = None,
    tune: bool = False,
    eval_text: str | Path | None = None,
    thresholds: dict[str, Any] | None = None,
    long_context: bool | None = None,
    progress: Progress | None = None,
) -> list[ExportResult]:
    """Export `model` (local dir, hub id or alias) to one target, or to every target with "all",
    and (verify=True, the default, as `edgekit export`) check each bundle's parity.

    `out` is the bundle directory for one target (default dist/<model>-<target>); with
    target="all" it is the parent directory of one bundle per target (default dist/).
    Each result's `.parity` is its ParityReport (None with verify=False); a failed parity gate
    does not raise here: check `result.parity.passed` or call edgekit.verification.gate.
    With tune=True each target's [[tune]] candidates (targets/<target>.toml) are exported and
    verified, and the smallest bundle that passes the thresholds is published, with every
    candidate's figures in manifest["tune"]; none passing raises GateFailed and writes nothing.
    Raises EdgekitError subclasses carrying the CLI exit code.
    """
    if eval_text and not verify:
        raise BadInput("--eval-text has no effect with --no-verify", "Drop one of them")
    if long_context and not verify:
        raise BadInput("--long-context has no effect with --no-verify", "Drop one of them")
    if tune and not verify:
        raise BadInput("--tune chooses by parity, so it cannot run with --no-verify", "Drop --no-verify")
    progress = progress or NullProgress()
    target = target or default_format()
    names = targets_for(target)
    checkpoint = resolve(
        model, revision=revision, offline=offline, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    recipes = {n: recipe_for(n, recipe) for n in names}  # bad recipe keys fail before any work
    for n in names:
        check_architecture(checkpoint, n)
    dests = destinations(checkpoint, target, names, out)
    for d in dests.values():
        check_destination(d, force)  # refuse all before building any
    preflight(checkpoint, dests, force, recipes)  # RAM and disk estimates; --force overrides
    options = VerifyOptions(eval_text=eval_text, thresholds=thresholds, offline=offline, long_context=long_context)
    if tune:
        return [tune_one(checkpoint, n, recipe, dests[n], force, options, progress) for n in names]
    results = []
    for n in names:
        flow = run_flow(
            checkpoint,
            n,
            recipes[n],
            dests[n],
            force=force,
            progress=progress,
            verify_options=options if verify else None,
        )
        results.append(dataclasses.replace(flow.export, parity=flow.parity))
    return results


def run_flow(
    checkpoint: Checkpoint,
    name: str,
    recipe: Any,
    dest: Path,
    *,
    force: bool,
    progress: Progress,
    offline: bool | None = None,
    verify_options: VerifyOptions | None = VerifyOptions(),
    bench_options: BenchOptions | None = None,
    eval_options: dict[str, Any] | None = None,
    manifest_sections: dict[str, Any] | None = None,
    tarball: Path | None = None,
) -> FlowResult:
    """One model x format through every stage asked for: export, then verify (verify_options),
    bench on each profile (bench_options), eval (eval_options: a build config's [eval]
    table), extra manifest sections, and a tarball. Gates never raise here; they are returned."""
    check_architecture(checkpoint, name)
    timings: dict[str, float] = {}
    t = time.monotonic()
    exported = export_one(checkpoint, name, recipe, dest, force, progress)
    timings["export_s"] = round(time.monotonic() - t, 1)
    gates: list[Gate] = []
    report = None
    if verify_options is not None:
        t = time.monotonic()
        report = verify(
            dest,
            eval_text=verify_options.eval_text,
            thresholds=verify_options.thresholds,
            offline=verify_options.offline,
            trust_remote_code=checkpoint.trust_remote_code,
            long_context=verify_options.long_context,
            progress=progress,
        )
        timings["verify_s"] = round(time.monotonic() - t, 1)
        gates += report.checks
    bench: list[dict[str, Any]] = []
    if bench_options is not None:
        # edgekit.bench is also the benchmark child's __main__ (python -m edgekit.bench); importing
        # it at module level would load it twice in that child, once via the package.
        from .bench import bench as run_bench

        t = time.monotonic()
        for profile in bench_options.profiles:
            budgets = bench_options.budgets.get(profile, {})
            r = run_bench(
                [dest],
                profile=profile,
                reps=bench_options.reps,
                warmup=bench_options.warmup,
                prompt_tokens=bench_options.prompt_tokens,
                gen_tokens=bench_options.gen_tokens,
                overrides=budgets or None,
                progress=progress,
            )[0]
            bench.append(bench_summary(r))
            gates += budget_gates(r, profile, budgets)
        timings["bench_s"] = round(time.monotonic() - t, 1)
    evaluation = None
    if eval_options:
        t, ev = time.monotonic(), eval_options
        profiles = bench_options.profiles if bench_options else ()
        rep = evaluate_bundles(
            [dest],
            tasks=ev["tasks"],
            limit=ev["limit"],
            reference=ev["reference"],
            profile=profiles[0] if profiles else None,
            offline=offline,
            trust_remote_code=checkpoint.trust_remote_code,
            progress=progress,
        )
        evaluation = build_summary(rep.bundles[0])
        gates += eval_gates(rep.bundles[0], {k: ev[k] for k in ev if k.startswith(("min_", "max_"))})
        timings["eval_s"] = round(time.monotonic() - t, 1)
    manifest = None
    if manifest_sections:
        update_manifest(dest, **manifest_sections)
    sha = None
    if tarball is not None:
        manifest = validate(dest)
        sha = pack(dest, tarball)
    return FlowResult(
        export=exported,
        parity=report,
        bench=tuple(bench),
        eval=evaluation,
        gates=tuple(gates),
        timings=timings,
        manifest=manifest,
        tarball_sha256=sha,
    )


def tune_one(
    checkpoint: Checkpoint,
    name: str,
    overrides: dict[str, Any] | None,
    dest: Path,
    force: bool,
    options: VerifyOptions,
    progress: Progress,
) -> ExportResult:
    """Export every candidate into a hidden work dir beside dest, verify each, publish the
    smallest passing one. The work dir carries the owner's pid, so a killed run is swept later."""
    candidates = load_targets().format(name).tune or ({"name": "default", "set": {}},)
    recipes = [recipe_for(name, {**(overrides or {}), **c["set"]}) for c in candidates]  # all typed first
    work = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}-tune"
    work.mkdir(parents=True, exist_ok=True)
    tried, results = [], []
    try:
        for i, (cand, rec) in enumerate(zip(candidates, recipes)):
            progress.note(f"tune {name}: candidate {i + 1}/{len(candidates)}: {cand['name']}")
            flow = run_flow(
                checkpoint, name, rec, work / str(i) / dest.name, force=False, progress=progress, verify_options=options
            )
            rep = flow.parity
            assert rep is not None  # tune runs every candidate with verify on
            results.append(flow.export)
            tried.append(
                {
                    "name": cand["name"],
                    "set": cand["set"],
                    "size_bytes": flow.export.size_bytes,
                    "kld_mean": rep.kld_mean,
                    "top1_agreement": rep.top1_agreement,
                    "ppl_ratio": rep.ppl_ratio,
                    "passed": rep.passed,
                    "failed": list(rep.failed),
                }
            )
        passing = [i for i, t in enumerate(tried) if t["passed"]]
        if not passing:
            figures = "; ".join(f"{t['name']}: {t['size_bytes'] / 1e6:.1f} MB, kld {t['kld_mean']:.4f}" for t in tried)
            raise GateFailed(
                f"tune {name}: no candidate passed the thresholds ({figures})",
                f"Add a larger [[tune]] candidate in a {name}.toml of your own (--targets-dir) or relax the thresholds",
            )
        best = min(passing, key=lambda i: (tried[i]["size_bytes"], tried[i]["kld_mean"]))
        check_destination(dest, force)
        dest.parent.mkdir(parents=True, exist_ok=True)
        publish(Path(results[best].bundle), dest, force)
        update_manifest(dest, tune={"chosen": tried[best]["name"], "tried": tried})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress.note(f"tune {name}: kept '{tried[best]['name']}' ({tried[best]['size_bytes'] / 1e6:.1f} MB)")
    return dataclasses.replace(results[best], bundle=str(dest))
