"""The verify step: a bundle's parity against the checkpoint it was exported from, its gate,
and the human table of the result."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .bundle import read_manifest, validate
from .checkpoint import Checkpoint, content_hash, resolve
from .errors import BadInput, GateFailed
from .formats import Session, backend
from .parity import ParityReport, Thresholds, verify_session, write_report
from .progress import NullProgress, Progress
from .reference import DEFAULT_WINDOW, load_eval_text
from .targets import load_targets


def open_bundle(
    bundle: str | Path, threads: int | None = None, validate_files: bool = True
) -> tuple[Session, dict[str, Any]]:
    """Validate a bundle (hashes, no extra/missing files), then open it in its runtime."""
    manifest = validate(Path(bundle)) if validate_files else read_manifest(Path(bundle))
    return backend(manifest["format"]).open_session(Path(bundle), manifest, threads=threads), manifest


def reference_checkpoint(
    manifest: dict[str, Any], reference: str | None, offline: bool | None, trust_remote_code: bool
) -> Checkpoint:
    """The checkpoint the bundle was exported from, checked by content hash."""
    src = manifest["source"]
    if reference:
        ck = resolve(reference, offline=offline, trust_remote_code=trust_remote_code)
    elif src.get("path") and Path(src["path"]).is_dir():
        ck = resolve(src["path"], trust_remote_code=trust_remote_code)
    elif src.get("alias") or src.get("hub_id"):
        ck = resolve(
            src.get("alias") or src["hub_id"],
            revision=src.get("revision"),
            offline=offline,
            trust_remote_code=trust_remote_code,
        )
    else:
        raise BadInput(
            f"the checkpoint this bundle was exported from is gone ({src.get('path')})",
            "Pass --reference PATH to the original checkpoint",
        )
    if src.get("content_sha256") and content_hash(ck.path) != src["content_sha256"]:
        raise BadInput(
            f"the reference checkpoint {ck.path} is not the one this bundle was exported from (content hash differs)",
            "Pass --reference with the original checkpoint",
        )
    return ck


def reference_checkpoints(
    bundles: Iterable[str | Path], reference: str | None, offline: bool | None, trust_remote_code: bool
) -> dict[str, Checkpoint]:
    """checkpoint content sha256 -> the checkpoint each bundle was exported from (one per
    distinct checkpoint, so bundles of several models can be evaluated in one run)."""
    refs: dict[str, Checkpoint] = {}
    for b in bundles:
        manifest = read_manifest(Path(b))
        sha = manifest["source"].get("content_sha256")
        if sha not in refs:
            refs[sha] = reference_checkpoint(manifest, reference, offline, trust_remote_code)
    return refs


def thresholds_for(fmt: str, overrides: dict[str, Any] | None = None) -> Thresholds:
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
    progress: Progress | None = None,
) -> ParityReport:
    """Parity of `bundle` against its unquantized checkpoint. Returns a ParityReport (check
    `.passed`, or call gate([report])); writes parity.json and the manifest summary into the
    bundle unless write=False.

    long_context: None (default) runs the long-context probe for checkpoints whose RoPE changes
    past an original context (LongRoPE, Llama 3 scaling, YaRN); True runs it for any model;
    False skips it."""
    progress = progress or NullProgress()
    window = window or DEFAULT_WINDOW
    if window < 8:
        raise BadInput(f"--window {window} is too small", "Use at least 8 tokens (default 512)")
    text = load_eval_text(eval_text)
    session, manifest = open_bundle(bundle)
    try:
        limits = thresholds_for(manifest["format"], thresholds)
        checkpoint = reference_checkpoint(manifest, reference, offline, trust_remote_code)
        report = verify_session(
            session,
            Path(bundle),
            manifest["format"],
            checkpoint,
            text,
            limits,
            window,
            progress,
            long_context=long_context,
        )
    finally:
        session.close()
    if write:
        write_report(Path(bundle), report)
    return report


def gate(reports: Iterable[ParityReport]) -> None:
    """The parity gate: GateFailed (exit 3) naming every bundle that failed and why."""
    failed = [f"{r.bundle}: {'; '.join(r.failed)}" for r in reports if not r.passed]
    if failed:
        raise GateFailed("parity gate failed: " + " | ".join(failed), "See parity.json in the bundle")


def print_parity(report: ParityReport) -> None:
    """The human table on stderr: every metric, its gate and whether it passed."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"parity: {report.bundle} ({report.format})", title_justify="left")
    for col in ("metric", "value", "gate", "ok"):
        table.add_column(col)
    gates = {c.name: c for c in report.checks}
    rows = [
        ("kld_mean", report.kld_mean),
        ("kld_p99", report.kld_p99),
        ("top1_agreement", report.top1_agreement),
        ("ppl_ref", report.ppl_ref),
        ("ppl_bundle", report.ppl_bundle),
        ("ppl_ratio", report.ppl_ratio),
        ("delta_p_mean", report.delta_p_mean),
        ("greedy_match_tokens_mean", report.greedy_match_tokens_mean),
        ("tokenizer_agreement", report.tokenizer_agreement),
        ("chat_template_match", report.chat_template_match),
    ]
    for name, value in rows:
        c = gates.get(name)
        shown = str(value) if isinstance(value, bool) else f"{value:.4f}"
        table.add_row(name, shown, f"{c.op} {c.threshold}" if c else "", ("✓" if c.passed else "✗ FAIL") if c else "")
    console = Console(stderr=True)
    console.print(table)
    ref = report.reference
    console.print(
        f"{report.positions} positions, reference {ref['dtype']} ({'cached' if ref['cached'] else 'computed'}), "
        f"{report.wall_s:.1f} s, peak RSS {report.peak_rss_mb:.0f} MiB",
        highlight=False,
    )
    for failure in report.tokenizer_failures[:5]:
        console.print(f"  tokenizer: {failure}", markup=False, highlight=False)
    lc = report.long_context
    if lc is not None:
        after = (
            f"past it KLD {lc.kld_mean_after:.3g}, top-1 {lc.top1_after:.3f}"
            if lc.kld_mean_after is not None
            else "no position past it (the bundle's context ends first)"
        )
        console.print(
            f"long context: {lc.positions} positions across token {lc.boundary} (prompt {lc.prompt_tokens}, "
            f"then one at a time): {after}; before it KLD {lc.kld_mean_before:.3g}; parity holds to "
            f"{lc.parity_context} tokens {'✓' if lc.passed else '✗ FAIL'}",
            markup=False,
            highlight=False,
        )
        if lc.limit:
            console.print(f"  {lc.limit}", markup=False, highlight=False)
