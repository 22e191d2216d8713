"""The library API; the CLI is a thin client of these functions.

The flow (see ../shared/DESIGN.md):

    checkpoint = resolve(model)                 # path | hub id | alias, validated
    with staging(dest) as tmp:                  # atomic: nothing at dest until complete
        notes = backend(target).export(checkpoint, tmp, recipe, progress)
        write bundle README + manifest (hashes, provenance, versions, wall time, peak RSS)
    session = backend(format).open_session(bundle)   # after validate(bundle)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import BadInput, EdgekitError, UnsupportedArchitecture

ALL = "all"


@dataclass(frozen=True)
class ExportResult:
    bundle: str
    format: str
    model: str
    path_taken: str
    wall_s: float
    peak_rss_mb: float
    size_bytes: int
    files: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _targets_for(target: str) -> list[str]:
    from .targets import load_targets

    targets = load_targets()
    if target == ALL:
        return sorted(targets.formats)
    targets.format(target)  # raises with the list of known targets
    return [target]


def _recipe(name: str, overrides: dict[str, Any] | None):
    from .formats import backend
    from .targets import load_targets

    spec = load_targets().format(name)
    table = {**spec.recipe, **(overrides or {})}
    return backend(name).parse_recipe(table, f"{spec.source} [recipe]")


def check_architecture(checkpoint, target: str) -> None:
    from .formats import backend

    mod = backend(target)
    supported = set(mod.SUPPORTED_ARCHITECTURES) | set(getattr(mod, "FALLBACK_ARCHITECTURES", ()))
    if checkpoint.architecture not in supported:
        raise UnsupportedArchitecture(
            f"architecture {checkpoint.architecture} is not supported by {target}",
            f"Supported: {', '.join(sorted(supported))}",
        )


def export(
    model: str,
    target: str = "onnx-int4",
    out: str | Path | None = None,
    *,
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
    progress=None,
) -> list[ExportResult]:
    """Export `model` (local dir, hub id or alias) to one target, or to every target with "all".

    `out` is the bundle directory for one target (default dist/<model>-<target>); with
    target="all" it is the parent directory of one bundle per target (default dist/).
    With tune=True each target's [[tune]] candidates (targets/<target>.toml) are exported and
    verified, and the smallest bundle that passes the thresholds is published, with every
    candidate's figures in manifest["tune"]; none passing raises GateFailed and writes nothing.
    Raises EdgekitError subclasses carrying the CLI exit code.
    """
    from .checkpoint import resolve
    from .progress import NullProgress

    progress = progress or NullProgress()
    names = _targets_for(target)
    checkpoint = resolve(model, revision=revision, offline=offline,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    recipes = {n: _recipe(n, recipe) for n in names}  # bad recipe keys fail before any work
    for n in names:
        check_architecture(checkpoint, n)

    dests = {}
    for n in names:
        if out is None:
            dests[n] = Path("dist") / f"{checkpoint.short_name}-{n}"
        elif target == ALL:
            dests[n] = Path(out) / f"{checkpoint.short_name}-{n}"
        else:
            dests[n] = Path(out)
    from .bundle import check_destination

    for d in dests.values():
        check_destination(d, force)  # refuse all before building any
    from .preflight import check as preflight

    preflight(checkpoint, dests, force)  # RAM and disk estimates; --force overrides
    if tune:
        return [_tune_one(checkpoint, n, recipe, dests[n], force, eval_text, thresholds, progress, long_context)
                for n in names]
    return [_export_one(checkpoint, n, recipes[n], dests[n], force, progress) for n in names]


def _tune_one(checkpoint, name: str, overrides: dict[str, Any] | None, dest: Path, force: bool,
              eval_text, thresholds, progress, long_context: bool | None = None) -> ExportResult:
    """Export every candidate into a hidden work dir beside dest, verify each, publish the
    smallest passing one. The work dir carries the owner's pid, so a killed run is swept later."""
    import os
    import shutil

    from .bundle import TMP_MARK, check_destination, publish, update_manifest
    from .errors import GateFailed
    from .targets import load_targets

    candidates = load_targets().format(name).tune or ({"name": "default", "set": {}},)
    recipes = [_recipe(name, {**(overrides or {}), **c["set"]}) for c in candidates]  # all typed first
    work = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}-tune"
    work.mkdir(parents=True, exist_ok=True)
    tried, results = [], []
    try:
        for i, (cand, rec) in enumerate(zip(candidates, recipes)):
            progress.note(f"tune {name}: candidate {i + 1}/{len(candidates)}: {cand['name']}")
            res = _export_one(checkpoint, name, rec, work / str(i) / dest.name, False, progress)
            rep = verify(res.bundle, eval_text=eval_text, thresholds=thresholds, progress=progress,
                         trust_remote_code=checkpoint.trust_remote_code, long_context=long_context)
            results.append(res)
            tried.append({"name": cand["name"], "set": cand["set"], "size_bytes": res.size_bytes,
                          "kld_mean": rep.kld_mean, "top1_agreement": rep.top1_agreement,
                          "ppl_ratio": rep.ppl_ratio, "passed": rep.passed, "failed": list(rep.failed)})
        passing = [i for i, t in enumerate(tried) if t["passed"]]
        if not passing:
            figures = "; ".join(f"{t['name']}: {t['size_bytes'] / 1e6:.1f} MB, kld {t['kld_mean']:.4f}" for t in tried)
            raise GateFailed(f"tune {name}: no candidate passed the thresholds ({figures})",
                             f"Add a larger [[tune]] candidate in a {name}.toml of your own (--targets-dir) "
                             "or relax the thresholds")
        best = min(passing, key=lambda i: (tried[i]["size_bytes"], tried[i]["kld_mean"]))
        check_destination(dest, force)
        dest.parent.mkdir(parents=True, exist_ok=True)
        publish(Path(results[best].bundle), dest, force)
        update_manifest(dest, tune={"chosen": tried[best]["name"], "tried": tried})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress.note(f"tune {name}: kept '{tried[best]['name']}' ({tried[best]['size_bytes'] / 1e6:.1f} MB)")
    return dataclasses.replace(results[best], bundle=str(dest))


def _export_one(checkpoint, name: str, recipe, dest: Path, force: bool, progress) -> ExportResult:
    from .bundle import bundle_size, now_iso, staging, write_manifest
    from .bundle_readme import render
    from .formats import backend
    from .measure import PeakRSS
    from .targets import load_targets

    spec = load_targets().format(name)
    mod = backend(name)
    progress.note(f"exporting {checkpoint.short_name} ({checkpoint.architecture}) to {name} -> {dest}")
    with staging(dest, force) as tmp:
        with PeakRSS() as usage:
            try:
                notes = mod.export(checkpoint, tmp.resolve(), recipe, progress)  # backends may chdir children
            except (OSError, EdgekitError) as e:
                _raise_if_disk_full(tmp, dest, e)
                raise
        manifest = {
            "name": dest.name,
            "format": name,
            "runtime": spec.runtime,
            "created_at": now_iso(),
            "edgekit_version": __version__,
            "source": checkpoint.provenance(),
            "quantization": {**dataclasses.asdict(recipe), **notes.quantization},
            "export": {
                "path_taken": notes.path_taken,
                "wall_s": round(usage.wall_s, 2),
                "peak_rss_mb": round(usage.peak_rss_mb, 1),
                "notes": list(notes.notes),
            },
            "tools": {"edgekit": __version__, **mod.tool_versions(), **notes.tools},
            "reproducible_files": list(notes.reproducible_files),
            "parity": None,
            "bench": {},
        }
        (tmp / "README.md").write_text(render(dest.name, manifest), encoding="utf-8")
        with progress.step("hashing files"):
            manifest = write_manifest(tmp, manifest)
    for n in notes.notes:
        progress.note(f"note: {n}")
    return ExportResult(
        bundle=str(dest), format=name, model=checkpoint.short_name, path_taken=notes.path_taken,
        wall_s=round(usage.wall_s, 2), peak_rss_mb=round(usage.peak_rss_mb, 1),
        size_bytes=bundle_size(manifest), files=len(manifest["files"]), notes=tuple(notes.notes),
    )


def _raise_if_disk_full(tmp: Path, dest: Path, error: BaseException) -> None:
    """Converters die of a full disk with messages like "4096 requested and 3424 written";
    name the cause instead. The staging directory is removed on the way out as usual."""
    import shutil

    from .errors import ToolFailed

    try:
        free = shutil.disk_usage(tmp).free
    except OSError:
        return
    said = any(m in str(error) for m in ("No space left", "Disk quota", "File too large", " requested and "))
    if free < 4 * 2**20 or said:  # a converter may delete its partial file before we look
        raise ToolFailed(f"disk full while exporting to {dest} ({free // 1024} KiB left on that filesystem; "
                         f"{type(error).__name__}: {str(error).splitlines()[0][:120]})",
                         "Free space or choose another --out; nothing was published") from None


def open_bundle(bundle: str | Path, threads: int | None = None, validate: bool = True):
    """Validate a bundle (hashes, no extra/missing files), then open it in its runtime."""
    from .bundle import read_manifest, validate as _validate
    from .formats import backend

    manifest = _validate(Path(bundle)) if validate else read_manifest(Path(bundle))
    return backend(manifest["format"]).open_session(Path(bundle), manifest, threads=threads), manifest


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
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = session.chat_prompt_ids(messages)
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
        bundle=str(bundle), format=manifest["format"], prompt=prompt, text=gen.text,
        prompt_tokens=len(ids), generated_tokens=n, stopped_by=gen.stopped_by,
        ttft_ms=round(ttft, 1), decode_tok_s=round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else 0.0,
        token_ids=tuple(gen.token_ids),
    )


def _reference_checkpoint(manifest: dict[str, Any], reference: str | None, offline: bool | None,
                          trust_remote_code: bool):
    """The checkpoint the bundle was exported from, checked by content hash."""
    from .checkpoint import content_hash, resolve

    src = manifest["source"]
    if reference:
        ck = resolve(reference, offline=offline, trust_remote_code=trust_remote_code)
    elif src.get("path") and Path(src["path"]).is_dir():
        ck = resolve(src["path"], trust_remote_code=trust_remote_code)
    elif src.get("alias") or src.get("hub_id"):
        ck = resolve(src.get("alias") or src["hub_id"], revision=src.get("revision"), offline=offline,
                     trust_remote_code=trust_remote_code)
    else:
        raise BadInput(f"the checkpoint this bundle was exported from is gone ({src.get('path')})",
                       "Pass --reference PATH to the original checkpoint")
    if src.get("content_sha256") and content_hash(ck.path) != src["content_sha256"]:
        raise BadInput(f"the reference checkpoint {ck.path} is not the one this bundle was exported from (content hash differs)",
                       "Pass --reference with the original checkpoint")
    return ck


def thresholds_for(fmt: str, overrides: dict[str, Any] | None = None):
    from .parity import Thresholds
    from .targets import load_targets

    spec = load_targets().format(fmt)
    table = {**spec.thresholds, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return Thresholds.from_table(table, f"{spec.source} [thresholds]")


def verify(
    bundle: str | Path,
    *,
    eval_text: str | Path | None = None,
    reference: str | None = None,
    thresholds: dict[str, Any] | None = None,
    window: int | None = None,
    offline: bool | None = None,
    trust_remote_code: bool = False,
    write: bool = True,
    long_context: bool | None = None,
    progress=None,
):
    """Parity of `bundle` against its unquantized checkpoint. Returns a ParityReport (check
    `.passed`); writes parity.json and the manifest summary into the bundle unless write=False.

    long_context: None (default) runs the long-context probe for checkpoints whose RoPE changes
    past an original context (LongRoPE, Llama 3 scaling, YaRN); True runs it for any model;
    False skips it."""
    from .parity import verify_session, write_report
    from .progress import NullProgress
    from .reference import DEFAULT_WINDOW, load_eval_text

    progress = progress or NullProgress()
    window = window or DEFAULT_WINDOW
    if window < 8:
        raise BadInput(f"--window {window} is too small", "Use at least 8 tokens (default 512)")
    text = load_eval_text(eval_text)
    session, manifest = open_bundle(bundle)
    try:
        limits = thresholds_for(manifest["format"], thresholds)
        checkpoint = _reference_checkpoint(manifest, reference, offline, trust_remote_code)
        report = verify_session(session, Path(bundle), manifest["format"], checkpoint, text, limits, window, progress,
                                long_context=long_context)
    finally:
        session.close()
    if write:
        write_report(Path(bundle), report)
    return report


def bench(
    bundles: list[str | Path] | tuple[str | Path, ...] = (),
    *,
    profile: str | None = None,
    reps: int = 5,
    warmup: int = 1,
    prompt_tokens: int | None = None,
    gen_tokens: int | None = None,
    overrides: dict[str, Any] | None = None,
    output: str | Path | None = None,
    write_manifest: bool = True,
    progress=None,
):
    """Prefill and decode tokens/sec, time to first token, peak RSS and bandwidth utilization of
    each bundle (default: every bundle under dist/) on a device profile (default: detected from
    this host), each in a fresh child process. Returns one BenchRecord per bundle.

    `overrides` replaces profile keys (e.g. {"max_peak_rss_mb": 512}). Unless write_manifest is
    False the latest record goes into each bundle's manifest.json under bench[profile][host_id];
    `output` appends one JSON line per record. Budgets do not raise here: check `record.passed`
    or call edgekit.bench.gate(records), which raises GateFailed (exit 3).
    """
    from .bench import bench as _bench

    return _bench(bundles, profile=profile, reps=reps, warmup=warmup, prompt_tokens=prompt_tokens,
                  gen_tokens=gen_tokens, overrides=overrides, output=output, write_manifest=write_manifest,
                  progress=progress)


def validate(path: str | Path) -> dict[str, Any]:
    """Check a bundle directory or a bundle tarball (.tar.gz) against its manifest: schema,
    every file's size and sha256, nothing missing or extra. A tarball's members are checked
    (no absolute paths, `..`, links or devices) before anything is extracted, into a temp dir
    that is removed afterwards. Returns the manifest; raises IntegrityError (exit 4)."""
    import tempfile

    from .bundle import validate as _validate
    from .tarball import extract_safely

    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tempfile.TemporaryDirectory(prefix="edgekit-validate-") as tmp:
            return _validate(extract_safely(path, Path(tmp) / "x"))
    if path.is_file():
        raise BadInput(f"{path} is neither a bundle directory nor a .tar.gz", "Pass a bundle directory or its tarball")
    return _validate(path)


def build(config: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Build the release matrix of an edgekit.toml; see edgekit.build.build."""
    from .build import build as _build

    return _build(config, **kwargs)


def load_tasks(tasks: str | Path | None = None, *, limit: int | None = None,
               normalization: dict[str, bool] | None = None):
    """Read and check a JSONL task file (default: edgekit's shipped set); see edgekit.tasks."""
    from .tasks import load_tasks as _load

    return _load(tasks, limit=limit, normalization=normalization)


def reference_checkpoints(bundles, reference: str | None, offline: bool | None, trust_remote_code: bool) -> dict[str, Any]:
    """checkpoint content sha256 -> the checkpoint each bundle was exported from (one per
    distinct checkpoint, so bundles of several models can be evaluated in one run)."""
    from .bench import discover_bundles
    from .bundle import read_manifest

    refs: dict[str, Any] = {}
    for b in bundles or discover_bundles():
        manifest = read_manifest(Path(b))
        sha = manifest["source"].get("content_sha256")
        if sha not in refs:
            refs[sha] = _reference_checkpoint(manifest, reference, offline, trust_remote_code)
    return refs


def evaluate(
    bundles: list[str | Path] | tuple[str | Path, ...] = (),
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
    max_paraphrase_drop: float = 0.10,
    max_format_sensitivity: float = 0.05,
    progress=None,
):
    """Run a task file (default: the shipped edgekit-basic set) on each bundle (default: every
    bundle under dist/) and on the unquantized reference in transformers, each in a fresh
    process. Returns an EvalReport: per bundle accuracy with a 95 % Wilson interval, per-match
    accuracy, delta, flips and McNemar's exact p against the reference, ECE of choice items,
    paraphrase drop and format sensitivity, TTFT / end-to-end latency p50 / p95 / max, decode
    tok/s, peak RSS and size. `reference` may be False (no baseline row) or a checkpoint path
    to use instead of the one in the manifest. Every input is checked before a model loads.
    """
    from .evaluate import evaluate as _evaluate

    task_set = load_tasks(tasks, limit=limit, normalization=normalization)
    refs = reference_checkpoints(bundles, reference if isinstance(reference, str) else None, offline,
                       trust_remote_code) if reference else {}
    return _evaluate(bundles, task_set, references=refs, profile=profile, overrides=overrides, output=output,
                     write_manifest=write_manifest, paraphrase_max=max_paraphrase_drop,
                     format_max=max_format_sensitivity, progress=progress)


def select(
    records=None,
    *,
    bundles: list[str | Path] | tuple[str | Path, ...] = (),
    from_json: str | Path | None = None,
    stored: bool = False,
    tasks: str | Path | None = None,
    limit: int | None = None,
    min_accuracy: float | None = None,
    max_accuracy_drop: float | None = None,
    max_p95_ms: float | None = None,
    max_rss_mb: float | None = None,
    max_size_mb: float | None = None,
    progress=None,
    **eval_kwargs: Any,
):
    """The Pareto set over (accuracy up, p95 end-to-end latency down, peak RSS down, size down)
    and the pick: the most accurate bundle that meets every constraint (ties: lower RSS, then
    smaller). Candidates come from `records` (EvalRecords or their summaries), from `from_json`
    (an `edgekit eval --json` document), from the bundles' manifests (stored=True, for the task
    file given), or else from a fresh evaluate(bundles, tasks=...). Returns a Selection; no
    feasible bundle raises GateFailed (exit 3) naming the nearest miss."""
    from .select import Constraints, candidates_from, load_eval_json, select as _select

    constraints = Constraints(min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop, max_p95_ms=max_p95_ms,
                              max_rss_mb=max_rss_mb, max_size_mb=max_size_mb)
    constraints.check()
    if records is None:
        if from_json is not None:
            records = load_eval_json(from_json)
        elif stored:
            from .bench import discover_bundles
            from .evaluate import stored_record

            key = load_tasks(tasks, limit=limit).key
            records = []
            for b in bundles or discover_bundles():
                rec = stored_record(b, key)
                if rec is None:
                    raise BadInput(f"{b} has no stored eval for {key}",
                                   "Run edgekit eval on it first, or drop --stored to evaluate now")
                records.append(rec)
        else:
            records = list(evaluate(bundles, tasks=tasks, limit=limit, progress=progress, **eval_kwargs).bundles)
    return _select(candidates_from(records), constraints)
