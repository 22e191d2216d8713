"""`edgekit build`: one config -> a matrix of verified, benchmarked, packed bundles and a report.

    config = load_config("edgekit.toml")
    for job in config.jobs() (or this shard's slice):          # model x format, one at a time
        in a child process (memory returns to the OS; a crash fails one entry, not the build):
            reuse the previous output if its inputs are unchanged, else
            export -> verify -> bench on each profile -> pack <id>.tar.gz
    compare with --baseline; write summary.json, summary.md, SHA256SUMS, report.html

The exit code is the worst outcome over all entries: 1 (an entry crashed) over 4 (integrity)
over 2 (bad input) over 3 (a gate failed) over 0.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BadInput, EdgekitError

SUMMARY = "summary.json"
SUMMARY_MD = "summary.md"
SUMS = "SHA256SUMS"
REPORT = "report.html"
SUMMARY_SCHEMA = "edgekit.build-summary"
SUMMARY_VERSION = 1
# Higher is worse: a crash outranks a broken file, which outranks bad input, then a gate.
_SEVERITY = {0: 0, 3: 1, 2: 2, 4: 3, 1: 4}


class BuildFailed(EdgekitError):
    """The matrix finished but some entry failed; carries the worst entry's exit code."""

    def __init__(self, problem: str, fix: str | None, exit_code: int, summary: dict[str, Any]):
        super().__init__(problem, fix)
        self.exit_code = exit_code
        self.summary = summary  # written to disk already; the CLI still prints it


def worst(codes) -> int:
    return max(codes, key=lambda c: _SEVERITY.get(c, 4), default=0)


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


def take_shard(jobs: list, shard: tuple[int, int] | None) -> list:
    """Round-robin slices of the sorted matrix: deterministic, and sizes differ by at most one."""
    if shard is None:
        return jobs
    k, n = shard
    return [j for i, j in enumerate(jobs) if i % n == k - 1]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _read_summary(directory: Path) -> dict[str, Any] | None:
    p = directory / SUMMARY
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SUMMARY_SCHEMA or not isinstance(doc.get("entries"), list):
        return None
    return doc


def read_summary(directory: Path, what: str) -> dict[str, Any]:
    doc = _read_summary(Path(directory))
    if doc is None:
        raise BadInput(f"{what} {directory} has no readable {SUMMARY}", f"Pass a directory written by `edgekit build`")
    return doc


# ------------------------------------------------------------------------------------------
# the matrix


def build(config: str | Path | None = None, *, out: str | Path | None = None, force: bool = False,
          baseline: str | Path | None = None, shard: str | None = None, offline: bool | None = None,
          progress=None) -> dict[str, Any]:
    """Build every entry of the config (or one shard of it) into `out`; returns the summary.
    Raises BuildFailed with the worst exit code when any entry failed (the outputs are written first)."""
    from .buildconfig import load_config
    from .lock import output_lock
    from .progress import NullProgress

    progress = progress or NullProgress()
    sh = parse_shard(shard)  # flags first: a typo there should not wait on the config
    cfg = load_config(config)
    out = Path(out or cfg.out)
    base = read_summary(Path(baseline), "--baseline") if baseline else None
    if cfg.eval_text and not Path(cfg.eval_text).is_file():
        raise BadInput(f"eval_text {cfg.eval_text} (from {cfg.path}) does not exist", "Fix [build] eval_text")
    if cfg.eval is not None:
        from .tasks import load_tasks

        load_tasks(cfg.eval.tasks, limit=cfg.eval.limit)  # a bad task file fails here, before any entry
    jobs = take_shard(cfg.jobs(), sh)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        previous = {e["id"]: e for e in (_read_summary(out) or {}).get("entries", [])}
        started = time.monotonic()
        entries = []
        for i, job in enumerate(jobs, 1):
            progress.note(f"[{i}/{len(jobs)}] {job.id} ({_elapsed(started)} elapsed)")
            entries.append(_run_job_child(cfg, job, out, previous.get(job.id), force, offline,
                                          quiet=isinstance(progress, NullProgress) or getattr(progress, "quiet", False)))
            e = entries[-1]
            progress.note(f"[{i}/{len(jobs)}] {job.id}: {e['status']}{' (reused: inputs unchanged)' if e.get('reused') else ''}"
                          f"{' - ' + e['message'] if e.get('message') else ''}")
        summary = _summary(cfg.path, cfg.sha256, entries, f"{sh[0]}/{sh[1]}" if sh else None, len(cfg.jobs()))
        if base is not None:
            compare_baseline(summary, base, cfg.regression)
        write_outputs(out, summary)
    _raise_worst(summary, out)
    return summary


def _elapsed(t0: float) -> str:
    s = int(time.monotonic() - t0)
    return f"{s // 60:02d}:{s % 60:02d}"


def _run_job_child(cfg, job, out: Path, previous: dict | None, force: bool, offline: bool | None,
                   quiet: bool) -> dict[str, Any]:
    """One entry in a fresh interpreter; its progress goes to our stderr, its record to a file."""
    import dataclasses

    spec = {
        "job": {"id": job.id, "format": job.format, "profiles": list(job.profiles),
                "model": dataclasses.asdict(job.model),
                "budgets": {p: job.budgets(cfg, p) for p in job.profiles}},
        "bench": {"reps": cfg.reps, "warmup": cfg.warmup, "prompt_tokens": cfg.prompt_tokens, "gen_tokens": cfg.gen_tokens},
        "eval_text": cfg.eval_text, "config_sha256": cfg.sha256, "out": str(out.resolve()),
        "eval": dataclasses.asdict(cfg.eval) if cfg.eval is not None else None,
        "previous": previous, "force": force, "offline": offline, "quiet": quiet,
    }
    with tempfile.TemporaryDirectory(prefix="edgekit-build-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "edgekit.build", str(spec_path), str(result_path)])
        if result_path.is_file():
            return json.loads(result_path.read_text(encoding="utf-8"))
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
    if proc.returncode in (-2, 130):
        raise KeyboardInterrupt
    return _entry(job.id, job.model.name, job.format, status="error", exit_code=1,
                  message=f"the build process for {job.id} {how} without a result (out of memory?)",
                  timings={"total_s": round(time.monotonic() - t0, 1)})


def _entry(id_: str, model: str, fmt: str, **kw: Any) -> dict[str, Any]:
    e = {"id": id_, "model": model, "format": fmt, "status": "ok", "exit_code": 0, "message": "", "reused": False,
         "bundle": None, "tarball": None, "tarball_sha256": None, "size_bytes": None, "input_key": None,
         "parity": None, "bench": [], "eval": None, "gates": [], "timings": {}}
    e.update(kw)
    return e


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's work for one entry (see _run_job_child). Never raises for an entry failure:
    the failure becomes the record's status, so the matrix goes on."""
    job = spec["job"]
    model = job["model"]
    out = Path(spec["out"])
    bundle = out / job["id"]
    tar_path = out / f"{job['id']}.tar.gz"
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    try:
        from . import api
        from .bundle import update_manifest, validate
        from .checkpoint import resolve
        from .formats import backend
        from .progress import RichProgress
        from .tarball import pack

        progress = RichProgress(quiet=spec.get("quiet", False))
        ck = resolve(model["source"], revision=model["revision"], offline=spec["offline"],
                     trust_remote_code=model["trust_remote_code"], allow_pickle=model["allow_pickle"])
        recipe = api._recipe(job["format"], model["recipe"].get(job["format"]))
        thresholds = api.thresholds_for(job["format"], model["thresholds"].get(job["format"]))
        inputs = {
            "checkpoint_sha256": ck.provenance().get("content_sha256"),
            "format": job["format"],
            "recipe": _jsonable(recipe),
            "thresholds": _jsonable(thresholds),
            "tools": {"edgekit": __version__, **backend(job["format"]).tool_versions()},
            "eval_text_sha256": _eval_sha(spec["eval_text"]),
            "bench": {**spec["bench"], "profiles": job["profiles"], "budgets": job["budgets"]},
        }
        if spec.get("eval"):
            from .tasks import load_tasks

            # the task file's hash, not its path, so an edited task file is never reused
            inputs["eval"] = {**spec["eval"], "tasks": None,
                              "tasks_sha256": load_tasks(spec["eval"]["tasks"]).sha256}
        key = _sha(inputs)
        prev = spec.get("previous")
        if not spec["force"] and _reusable(prev, key, bundle, tar_path):
            # Its own gates still hold; a previous --baseline comparison is redone by the caller.
            gates = [g for g in prev["gates"] if g["kind"] != "regression"]
            failed = [g for g in gates if not g["passed"]]
            return {**prev, "reused": True, "gates": gates, "status": "gate_failed" if failed else "ok",
                    "exit_code": 3 if failed else 0, "message": "; ".join(_gate_text(g) for g in failed),
                    "baseline": None, "timings": {"total_s": round(time.monotonic() - t0, 1)},
                    "built_timings": prev.get("built_timings") or prev["timings"]}

        tar_path.unlink(missing_ok=True)  # never leave a tarball of an older bundle beside a new one
        t = time.monotonic()
        api.export(model["source"], job["format"], bundle, force=True, revision=model["revision"], offline=spec["offline"],
                   trust_remote_code=model["trust_remote_code"], allow_pickle=model["allow_pickle"],
                   recipe=model["recipe"].get(job["format"]), progress=progress)
        timings["export_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        report = api.verify(bundle, eval_text=spec["eval_text"], thresholds=model["thresholds"].get(job["format"]),
                            offline=spec["offline"], trust_remote_code=model["trust_remote_code"], progress=progress)
        timings["verify_s"] = round(time.monotonic() - t, 1)
        gates = [{"kind": "parity", "name": c.name, "figure": c.value, "op": c.op, "threshold": c.threshold,
                  "passed": c.passed} for c in report.checks]
        t = time.monotonic()
        bench = []
        for profile in job["profiles"]:
            budgets = job["budgets"].get(profile, {})
            records = api.bench([bundle], profile=profile, reps=spec["bench"]["reps"], warmup=spec["bench"]["warmup"],
                                prompt_tokens=spec["bench"]["prompt_tokens"], gen_tokens=spec["bench"]["gen_tokens"],
                                overrides=budgets or None, progress=progress)
            r = records[0]
            bench.append(_bench_summary(r))
            gates += _budget_gates(r, profile, budgets)
        timings["bench_s"] = round(time.monotonic() - t, 1)
        evaluation = None
        if spec.get("eval"):
            from .evaluate import build_summary, gates as eval_gates

            t, ev = time.monotonic(), spec["eval"]
            rep = api.evaluate([bundle], tasks=ev["tasks"], limit=ev["limit"], reference=ev["reference"],
                               profile=job["profiles"][0] if job["profiles"] else None, offline=spec["offline"],
                               trust_remote_code=model["trust_remote_code"], progress=progress)
            evaluation = build_summary(rep.bundles[0])
            gates += eval_gates(rep.bundles[0], {k: ev[k] for k in ev if k.startswith(("min_", "max_"))})
            timings["eval_s"] = round(time.monotonic() - t, 1)
        update_manifest(bundle, build={"input_key": key, "inputs": inputs, "config_sha256": spec["config_sha256"]})
        manifest = validate(bundle)
        sha = pack(bundle, tar_path)
        failed = [g for g in gates if not g["passed"]]
        timings["total_s"] = round(time.monotonic() - t0, 1)
        return _entry(job["id"], model["name"], job["format"],
                      status="gate_failed" if failed else "ok", exit_code=3 if failed else 0,
                      message="; ".join(_gate_text(g) for g in failed),
                      bundle=bundle.name, tarball=tar_path.name, tarball_sha256=sha,
                      size_bytes=sum(f["size"] for f in manifest["files"]), input_key=key,
                      parity=report.summary(), bench=bench, eval=evaluation, gates=gates, timings=timings,
                      reproducible_files=manifest.get("reproducible_files", []))
    except EdgekitError as e:
        tar_path.unlink(missing_ok=True)
        timings["total_s"] = round(time.monotonic() - t0, 1)
        return _entry(job["id"], model["name"], job["format"], status="error", exit_code=e.exit_code,
                      message=e.one_line(), timings=timings)
    except Exception as e:  # noqa: BLE001 - one entry's crash must not stop the matrix
        tar_path.unlink(missing_ok=True)
        timings["total_s"] = round(time.monotonic() - t0, 1)
        first = str(e).splitlines()[0] if str(e) else ""
        return _entry(job["id"], model["name"], job["format"], status="error", exit_code=1,
                      message=f"unexpected {type(e).__name__}: {first}", timings=timings)


def _jsonable(obj: Any) -> Any:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj, default=str))


def _sha(obj: Any) -> str:
    import hashlib

    from .buildconfig import canonical

    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def _eval_sha(path: str | None) -> str:
    from .parity import text_sha256
    from .reference import load_eval_text

    return text_sha256(load_eval_text(path))


def _reusable(prev: dict | None, key: str, bundle: Path, tar_path: Path) -> bool:
    """Reuse only what is provably the same: same inputs, bundle intact, tarball unchanged."""
    from .bundle import validate
    from .checkpoint import sha256_file as _sha256

    if not prev or prev.get("input_key") != key or prev.get("status") not in ("ok", "gate_failed"):
        return False
    try:
        manifest = validate(bundle)
    except EdgekitError:
        return False
    if manifest.get("build", {}).get("input_key") != key or not tar_path.is_file():
        return False
    return _sha256(tar_path) == prev.get("tarball_sha256")


def _bench_summary(r) -> dict[str, Any]:
    keys = ("profile", "host_id", "load_s", "ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_tok_s_stddev",
            "peak_rss_mb", "bandwidth_utilization", "threads", "prompt_tokens", "gen_tokens", "reps", "substitutions")
    return {k: (list(v) if isinstance(v := getattr(r, k), tuple) else v) for k in keys}


def _budget_gates(r, profile: str, overrides: dict[str, float]) -> list[dict[str, Any]]:
    from .targets import load_targets

    p = load_targets().profile(profile)
    limits = {k: overrides.get(k, getattr(p, k)) for k in ("max_peak_rss_mb", "max_bundle_mb", "min_decode_tok_s")}
    figures = {"max_peak_rss_mb": r.peak_rss_mb, "max_bundle_mb": round(r.bundle_bytes / 2**20, 1),
               "min_decode_tok_s": r.decode_tok_s}
    gates = []
    for k, limit in limits.items():
        if limit is None:
            continue
        op = ">=" if k.startswith("min") else "<="
        fig = figures[k]
        gates.append({"kind": "budget", "name": f"{profile}.{k}", "figure": fig, "op": op, "threshold": limit,
                      "passed": fig >= limit if op == ">=" else fig <= limit})
    return gates


def _gate_text(g: dict[str, Any]) -> str:
    fig = g["figure"]
    shown = f"{fig:.4g}" if isinstance(fig, float) else str(fig)
    base = f" (baseline {g['baseline']:.4g})" if g.get("baseline") is not None else ""
    return f"{g['name']} {shown}{base} fails {g['op']} {g['threshold']:.4g}" if not isinstance(g["threshold"], bool) \
        else f"{g['name']} {shown} fails {g['op']} {g['threshold']}"


# ------------------------------------------------------------------------------------------
# summary, baseline, merge


def _summary(config: str, config_sha: str, entries: list[dict[str, Any]], shard: str | None, total: int) -> dict[str, Any]:
    from .host import facts

    h = facts()
    return {
        "schema": SUMMARY_SCHEMA, "schema_version": SUMMARY_VERSION, "edgekit_version": __version__,
        "created_at": _now(), "config": str(config), "config_sha256": config_sha, "shard": shard,
        "matrix_size": total, "host": _jsonable(h),
        "entries": sorted(entries, key=lambda e: e["id"]),
        "worst_exit_code": worst(e["exit_code"] for e in entries),
    }


def compare_baseline(summary: dict[str, Any], base: dict[str, Any], margins: dict[str, float]) -> None:
    """Add a regression gate per compared figure to each entry that the baseline also has;
    an entry that regressed beyond its margin becomes gate_failed (exit 3)."""
    old = {e["id"]: e for e in base.get("entries", [])}
    for e in summary["entries"]:
        b = old.get(e["id"])
        if e["status"] == "error" or not b or not b.get("parity") or not e.get("parity"):
            e["baseline"] = None if not b else "not comparable"
            continue
        gates = []

        def add(name, new, before, limit, op):
            if new is None or before is None:
                return
            passed = new <= limit if op == "<=" else new >= limit
            gates.append({"kind": "regression", "name": name, "figure": new, "baseline": before, "op": op,
                          "threshold": round(limit, 6), "delta": round(new - before, 6), "passed": passed})

        p, q = e["parity"], b["parity"]
        add("kld_mean", p.get("kld_mean"), q.get("kld_mean"), q.get("kld_mean", 0) * (1 + margins["kld_mean_rel"]), "<=")
        add("top1_agreement", p.get("top1_agreement"), q.get("top1_agreement"),
            (q.get("top1_agreement") or 0) - margins["top1_agreement_abs"], ">=")
        add("ppl_ratio", p.get("ppl_ratio"), q.get("ppl_ratio"), (q.get("ppl_ratio") or 0) + margins["ppl_ratio_abs"], "<=")
        if e.get("size_bytes") and b.get("size_bytes"):
            add("size_bytes", e["size_bytes"], b["size_bytes"], b["size_bytes"] * (1 + margins["size_rel"]), "<=")
        old_bench = {(r["profile"], r.get("host_id")): r for r in b.get("bench", [])}
        for r in e.get("bench", []):
            o = old_bench.get((r["profile"], r.get("host_id")))
            if o is None:
                continue  # speed is only comparable on the same host
            add(f"{r['profile']}.decode_tok_s", r["decode_tok_s"], o["decode_tok_s"],
                o["decode_tok_s"] * (1 - margins["decode_tok_s_rel"]), ">=")
            add(f"{r['profile']}.prefill_tok_s", r["prefill_tok_s"], o["prefill_tok_s"],
                o["prefill_tok_s"] * (1 - margins["prefill_tok_s_rel"]), ">=")
            add(f"{r['profile']}.peak_rss_mb", r["peak_rss_mb"], o["peak_rss_mb"],
                o["peak_rss_mb"] * (1 + margins["peak_rss_rel"]), "<=")
        e["gates"] = [g for g in e["gates"] if g["kind"] != "regression"] + gates
        e["baseline"] = base.get("created_at")
        failed = [g for g in e["gates"] if not g["passed"]]
        if failed and e["status"] == "ok":
            e["status"], e["exit_code"] = "gate_failed", 3
        if failed:
            e["message"] = "; ".join(_gate_text(g) for g in failed)
    summary["baseline"] = {"created_at": base.get("created_at"), "config_sha256": base.get("config_sha256")}
    summary["worst_exit_code"] = worst(e["exit_code"] for e in summary["entries"])


def merge(dirs: list[str | Path], out: str | Path, *, baseline: str | Path | None = None, progress=None) -> dict[str, Any]:
    """Combine shard outputs into `out`: bundles and tarballs copied in (if elsewhere), one
    summary, SHA256SUMS and report. Shards must come from the same config."""
    from .buildconfig import _REGRESSION_DEFAULTS
    from .lock import output_lock
    from .progress import NullProgress
    from .checkpoint import sha256_file as _sha256

    progress = progress or NullProgress()
    out = Path(out)
    docs = [(Path(d), read_summary(Path(d), "--merge")) for d in dirs]
    shas = {doc["config_sha256"] for _, doc in docs}
    if len(shas) != 1:
        raise BadInput("the shards were built from different configs (config_sha256 differs)", "Merge shards of one build only")
    base = read_summary(Path(baseline), "--baseline") if baseline else None
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    with output_lock(out):
        for d, doc in docs:
            for e in doc["entries"]:
                if e["id"] in entries:
                    raise BadInput(f"entry {e['id']} appears in two shards ({d})", "Each shard must be a distinct K of the same N")
                if e.get("tarball"):
                    src = d / e["tarball"]
                    if not src.is_file() or _sha256(src) != e["tarball_sha256"]:
                        from .errors import IntegrityError

                        raise IntegrityError(f"{src} is missing or does not match its sha256 in {d / SUMMARY}",
                                             "Re-run or re-download that shard")
                    if d.resolve() != out.resolve():
                        shutil.copyfile(src, out / e["tarball"])
                        if (d / e["bundle"]).is_dir():
                            shutil.rmtree(out / e["bundle"], ignore_errors=True)
                            shutil.copytree(d / e["bundle"], out / e["bundle"])
                entries[e["id"]] = e
                progress.note(f"merged {e['id']} from {d}")
        first = docs[0][1]
        summary = _summary(first["config"], first["config_sha256"], list(entries.values()), None, first["matrix_size"])
        summary["merged_from"] = [str(d) for d, _ in docs]
        if len(entries) != first["matrix_size"]:
            summary["incomplete"] = f"{len(entries)} of {first['matrix_size']} matrix entries"
        if base is not None:
            compare_baseline(summary, base, _REGRESSION_DEFAULTS)
        write_outputs(out, summary)
    _raise_worst(summary, out)
    return summary


def _raise_worst(summary: dict[str, Any], out: Path) -> None:
    code = summary["worst_exit_code"]
    if code == 0:
        return
    bad = [e for e in summary["entries"] if e["exit_code"] != 0]
    listed = "; ".join(f"{e['id']}: {e['message'] or e['status']}" for e in bad[:3])
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    what = "failed a gate" if code == 3 else "failed"
    raise BuildFailed(f"{len(bad)} of {len(summary['entries'])} entries {what}: {listed}{more}",
                      f"See {out / SUMMARY_MD}", code, summary)


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    from .report import render_html

    _atomic(out / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _atomic(out / SUMMARY_MD, render_markdown(summary))
    sums = "".join(f"{e['tarball_sha256']}  {e['tarball']}\n" for e in summary["entries"] if e.get("tarball"))
    _atomic(out / SUMS, sums)
    _atomic(out / REPORT, render_html(summary))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.edgekit-tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render_markdown(summary: dict[str, Any]) -> str:
    h = summary.get("host") or {}
    lines = [f"# edgekit build: {len(summary['entries'])} bundles", "",
             f"edgekit {summary['edgekit_version']}, {summary['created_at']}, config `{Path(summary['config']).name}` "
             f"(sha256 {summary['config_sha256'][:12]}), host {h.get('cpu', '?')}, {h.get('logical_cores', '?')} cores.",
             "", "| bundle | status | size MiB | kld_mean | top-1 | PPL ratio | profile | prefill tok/s | decode tok/s | TTFT ms | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary["entries"]:
        p = e.get("parity") or {}
        size = f"{e['size_bytes'] / 2**20:.1f}" if e.get("size_bytes") else "-"
        status = e["status"] + (" (reused)" if e.get("reused") else "")
        cells = [e["id"], status, size, _fmt(p.get("kld_mean"), 4), _fmt(p.get("top1_agreement"), 3), _fmt(p.get("ppl_ratio"), 3)]
        bench = e.get("bench") or [{}]
        for r in bench:
            lines.append("| " + " | ".join(cells + [r.get("profile", "-"), _fmt(r.get("prefill_tok_s"), 1),
                                                     _fmt(r.get("decode_tok_s"), 1), _fmt(r.get("ttft_ms"), 0),
                                                     _fmt(r.get("peak_rss_mb"), 0)]) + " |")
    lines += _eval_markdown(summary)
    failed = [(e["id"], g) for e in summary["entries"] for g in e.get("gates", []) if not g["passed"]]
    errors = [e for e in summary["entries"] if e["status"] == "error"]
    lines += ["", f"Gates: {sum(len(e.get('gates', [])) for e in summary['entries'])} checked, {len(failed)} failed."]
    for id_, g in failed:
        lines.append(f"- **{id_}**: {g['kind']} {_gate_text(g)}")
    for e in errors:
        lines.append(f"- **{e['id']}**: error (exit {e['exit_code']}): {e['message']}")
    lines.append("")
    return "\n".join(lines)


def _eval_markdown(summary: dict[str, Any]) -> list[str]:
    rows = [e for e in summary["entries"] if e.get("eval")]
    if not rows:
        return []
    lines = ["", f"Eval on `{rows[0]['eval']['tasks']}` ({rows[0]['eval']['n_items']} items; latency: generation items, "
             "after one warm-up):", "",
             "| bundle | accuracy [95% CI] | reference | Δ | flip rate | McNemar p | ECE | p50 / p95 e2e ms | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in rows:
        v = e["eval"]
        lines.append(f"| {e['id']} | {v['accuracy']:.3f} [{v['accuracy_low']:.3f}, {v['accuracy_high']:.3f}] | "
                     f"{_fmt(v['reference_accuracy'], 3)} | {_fmt(v['accuracy_delta'], 3)} | {_fmt(v['flip_rate'], 3)} | "
                     f"{_fmt(v['mcnemar_p'], 3)} | {_fmt(v['ece'], 3)} | {_fmt(v['e2e_ms_p50'], 0)} / "
                     f"{_fmt(v['e2e_ms_p95'], 0)} | {_fmt(v['peak_rss_mb'], 0)} |")
    return lines


def _fmt(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def child_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run_job(spec)
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(result, default=str), encoding="utf-8")
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    import signal

    from .cli import _on_sigterm

    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(child_main(sys.argv[1:]))
