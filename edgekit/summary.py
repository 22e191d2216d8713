"""A build's summary: the typed records summary.json holds, how it is read back, and its
Markdown rendering. Shared by build (writes it) and report (reads it), so neither imports
the other.

The JSON keys are the ones summary.json has always had; to_dict/from_dict round-trip them,
so stored results from older builds still read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput, ExitCode
from .gates import Gate

SUMMARY = "summary.json"
SUMMARY_MD = "summary.md"
SUMS = "SHA256SUMS"
REPORT = "report.html"
SUMMARY_SCHEMA = "edgekit.build-summary"
SUMMARY_VERSION = 1

# Higher is worse: a crash outranks a broken file, which outranks bad input, then a gate.
_SEVERITY: dict[int, int] = {
    ExitCode.OK: 0,
    ExitCode.GATE_FAILED: 1,
    ExitCode.BAD_INPUT: 2,
    ExitCode.INTEGRITY: 3,
    ExitCode.ERROR: 4,
}


def worst(codes: Iterable[int]) -> int:
    """The exit code of a matrix: its worst entry's (unknown codes count as a crash)."""
    return max(codes, key=lambda c: _SEVERITY.get(c, 4), default=ExitCode.OK)


@dataclass(frozen=True)
class BuildEntry:
    """One model x format of a build matrix: what happened and every figure it produced."""

    id: str
    model: str
    format: str
    status: str = "ok"  # "ok" | "gate_failed" | "error"
    exit_code: int = ExitCode.OK
    message: str = ""  # failed gates or the error, one line
    reused: bool = False  # inputs unchanged: the previous output was kept
    bundle: str | None = None  # directory name under the output directory
    tarball: str | None = None
    tarball_sha256: str | None = None
    size_bytes: int | None = None
    input_key: str | None = None  # sha256 of every input; equal key = reusable
    parity: dict[str, Any] | None = None  # ParityReport.summary()
    bench: tuple[dict[str, Any], ...] = ()  # one bench summary per profile
    eval: dict[str, Any] | None = None  # evaluate.build_summary()
    gates: tuple[Gate, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    baseline: str | None = None  # the baseline's created_at, "not comparable", or None
    built_timings: dict[str, float] | None = None  # a reused entry: the timings of the run that built it
    reproducible_files: tuple[str, ...] = ()

    @property
    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def with_gates(self, gates: Iterable[Gate]) -> BuildEntry:
        """The entry judged by `gates`: an ok entry with a failed gate becomes gate_failed (exit 3)."""
        gates = tuple(gates)
        failed = [g for g in gates if not g.passed]
        if self.status == "error":
            return dataclasses.replace(self, gates=gates)
        return dataclasses.replace(
            self,
            gates=gates,
            status="gate_failed" if failed else "ok",
            exit_code=ExitCode.GATE_FAILED if failed else ExitCode.OK,
            message=gate_message(failed),
        )

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["exit_code"] = int(self.exit_code)
        d["bench"] = [dict(b) for b in self.bench]
        d["gates"] = [g.to_dict() for g in self.gates]
        d["reproducible_files"] = list(self.reproducible_files)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildEntry:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["bench"] = tuple(d.get("bench") or ())
        kw["gates"] = tuple(Gate.from_dict(g) for g in d.get("gates") or ())
        kw["reproducible_files"] = tuple(d.get("reproducible_files") or ())
        kw["timings"] = dict(d.get("timings") or {})
        return cls(**kw)


@dataclass(frozen=True)
class BuildSummary:
    """summary.json: the matrix, where and from what it was built, and its worst exit code."""

    config: str
    config_sha256: str
    edgekit_version: str
    created_at: str
    host: dict[str, Any]
    matrix_size: int
    entries: tuple[BuildEntry, ...]
    shard: str | None = None  # "K/N" when one slice was built
    baseline: dict[str, Any] | None = None  # the compared build: created_at, config_sha256
    merged_from: tuple[str, ...] | None = None  # --merge: the shard directories
    incomplete: str | None = None  # --merge: "k of n matrix entries"
    schema: str = SUMMARY_SCHEMA
    schema_version: int = SUMMARY_VERSION

    @property
    def worst_exit_code(self) -> int:
        return worst(e.exit_code for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": self.schema,
            "schema_version": self.schema_version,
            "edgekit_version": self.edgekit_version,
            "created_at": self.created_at,
            "config": self.config,
            "config_sha256": self.config_sha256,
            "shard": self.shard,
            "matrix_size": self.matrix_size,
            "host": self.host,
            "entries": [e.to_dict() for e in sorted(self.entries, key=lambda e: e.id)],
            "worst_exit_code": int(self.worst_exit_code),
        }
        # written only when they mean something, as summary.json always has been
        if self.baseline is not None:
            d["baseline"] = self.baseline
        if self.merged_from is not None:
            d["merged_from"] = list(self.merged_from)
        if self.incomplete is not None:
            d["incomplete"] = self.incomplete
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildSummary:
        return cls(
            config=d["config"],
            config_sha256=d["config_sha256"],
            edgekit_version=d["edgekit_version"],
            created_at=d["created_at"],
            host=d.get("host") or {},
            matrix_size=d["matrix_size"],
            entries=tuple(BuildEntry.from_dict(e) for e in d["entries"]),
            shard=d.get("shard"),
            baseline=d.get("baseline"),
            merged_from=tuple(d["merged_from"]) if d.get("merged_from") is not None else None,
            incomplete=d.get("incomplete"),
            schema=d.get("schema", SUMMARY_SCHEMA),
            schema_version=d.get("schema_version", SUMMARY_VERSION),
        )


def gate_message(failed: Iterable[Gate]) -> str:
    return "; ".join(g.text() for g in failed)


def try_read_summary(directory: Path) -> BuildSummary | None:
    """The summary in `directory`, or None when there is none or it is not one of ours."""
    p = Path(directory) / SUMMARY
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SUMMARY_SCHEMA or not isinstance(doc.get("entries"), list):
        return None
    try:
        return BuildSummary.from_dict(doc)
    except (KeyError, TypeError):
        return None


def read_summary(directory: Path, what: str) -> BuildSummary:
    doc = try_read_summary(Path(directory))
    if doc is None:
        raise BadInput(f"{what} {directory} has no readable {SUMMARY}", "Pass a directory written by `edgekit build`")
    return doc


def render_markdown(summary: dict[str, Any]) -> str:
    h = summary.get("host") or {}
    lines = [
        f"# edgekit build: {len(summary['entries'])} bundles",
        "",
        f"edgekit {summary['edgekit_version']}, {summary['created_at']}, config `{Path(summary['config']).name}` "
        f"(sha256 {summary['config_sha256'][:12]}), host {h.get('cpu', '?')}, {h.get('logical_cores', '?')} cores.",
        "",
        "| bundle | status | size MiB | kld_mean | top-1 | PPL ratio | profile | prefill tok/s | decode tok/s | TTFT ms | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["entries"]:
        p = e.get("parity") or {}
        size = f"{e['size_bytes'] / 2**20:.1f}" if e.get("size_bytes") else "-"
        status = e["status"] + (" (reused)" if e.get("reused") else "")
        cells = [
            e["id"],
            status,
            size,
            _fmt(p.get("kld_mean"), 4),
            _fmt(p.get("top1_agreement"), 3),
            _fmt(p.get("ppl_ratio"), 3),
        ]
        bench = e.get("bench") or [{}]
        for r in bench:
            lines.append(
                "| "
                + " | ".join(
                    cells
                    + [
                        r.get("profile", "-"),
                        _fmt(r.get("prefill_tok_s"), 1),
                        _fmt(r.get("decode_tok_s"), 1),
                        _fmt(r.get("ttft_ms"), 0),
                        _fmt(r.get("peak_rss_mb"), 0),
                    ]
                )
                + " |"
            )
    lines += _eval_markdown(summary)
    failed = [(e["id"], Gate.from_dict(g)) for e in summary["entries"] for g in e.get("gates", []) if not g["passed"]]
    errors = [e for e in summary["entries"] if e["status"] == "error"]
    lines += ["", f"Gates: {sum(len(e.get('gates', [])) for e in summary['entries'])} checked, {len(failed)} failed."]
    for id_, g in failed:
        lines.append(f"- **{id_}**: {g.kind} {g.text()}")
    for e in errors:
        lines.append(f"- **{e['id']}**: error (exit {e['exit_code']}): {e['message']}")
    lines.append("")
    return "\n".join(lines)


def _eval_markdown(summary: dict[str, Any]) -> list[str]:
    rows = [e for e in summary["entries"] if e.get("eval")]
    if not rows:
        return []
    lines = [
        "",
        f"Eval on `{rows[0]['eval']['tasks']}` ({rows[0]['eval']['n_items']} items; latency: generation items, "
        "after one warm-up):",
        "",
        "| bundle | accuracy [95% CI] | reference | Δ | flip rate | McNemar p | ECE | p50 / p95 e2e ms | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        v = e["eval"]
        lines.append(
            f"| {e['id']} | {v['accuracy']:.3f} [{v['accuracy_low']:.3f}, {v['accuracy_high']:.3f}] | "
            f"{_fmt(v['reference_accuracy'], 3)} | {_fmt(v['accuracy_delta'], 3)} | {_fmt(v['flip_rate'], 3)} | "
            f"{_fmt(v['mcnemar_p'], 3)} | {_fmt(v['ece'], 3)} | {_fmt(v['e2e_ms_p50'], 0)} / "
            f"{_fmt(v['e2e_ms_p95'], 0)} | {_fmt(v['peak_rss_mb'], 0)} |"
        )
    return lines


def _fmt(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
