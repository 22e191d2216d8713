"""`edgekit report`: one self-contained HTML file from a build's summary.json.

Plots are matplotlib SVG inlined into the page (no scripts, no network), so the file can be
attached to a release or opened from a CI artifact as is.
"""

from __future__ import annotations

import dataclasses
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInput
from .fileio import write_text
from .formats import REGISTRY, backend
from .select import Constraints, candidates_from, select
from .summary import REPORT, read_summary

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def format_color(fmt: str) -> str:
    """Each backend names its plot colour; a format this install does not know is grey."""
    return backend(fmt).PLOT_COLOR if fmt in REGISTRY else "#555"


POINT_ALPHA = 0.8  # overlapping points stay visible


def points(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per model x format x profile that has both a parity and a bench figure."""
    out = []
    for e in summary["entries"]:
        p = e.get("parity") or {}
        for r in e.get("bench") or []:
            if p.get("kld_mean") is not None and r.get("decode_tok_s"):
                out.append(
                    {
                        "id": e["id"],
                        "format": e["format"],
                        "profile": r["profile"],
                        "kld_mean": p["kld_mean"],
                        "decode_tok_s": r["decode_tok_s"],
                        "size_mb": (e.get("size_bytes") or 0) / 2**20,
                        "peak_rss_mb": r.get("peak_rss_mb"),
                    }
                )
    return out


def pareto_front(pts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both axes (lower KLD and higher decode speed)."""
    front = []
    for a in pts:
        dominated = any(
            b is not a
            and b["kld_mean"] <= a["kld_mean"]
            and b["decode_tok_s"] >= a["decode_tok_s"]
            and (b["kld_mean"] < a["kld_mean"] or b["decode_tok_s"] > a["decode_tok_s"])
            for b in pts
        )
        if not dominated:
            front.append(a)
    return sorted(front, key=lambda p: p["decode_tok_s"])


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})  # same summary, same bytes
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: invalid inside HTML


def tradeoff_svg(pts: list[dict[str, Any]]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    biggest = max((p["size_mb"] for p in pts), default=1) or 1
    for fmt in sorted({p["format"] for p in pts}):
        sel = [p for p in pts if p["format"] == fmt]
        ax.scatter(
            [p["decode_tok_s"] for p in sel],
            [p["kld_mean"] for p in sel],
            s=[80 + 400 * p["size_mb"] / biggest for p in sel],
            alpha=POINT_ALPHA,
            color=format_color(fmt),
            label=fmt,
            edgecolors="black",
            linewidths=0.5,
        )
    front = pareto_front(pts)
    if front:
        ax.plot(
            [p["decode_tok_s"] for p in front],
            [p["kld_mean"] for p in front],
            "--",
            color="#2ca02c",
            label="Pareto front",
            zorder=0,
        )
        ax.scatter(
            [p["decode_tok_s"] for p in front],
            [p["kld_mean"] for p in front],
            s=260,
            facecolors="none",
            edgecolors="#2ca02c",
            linewidths=1.5,
        )  # ring the points on the front
    for p in pts:
        ax.annotate(
            f"{p['id']} @ {p['profile']}",
            (p["decode_tok_s"], p["kld_mean"]),
            fontsize=7,
            xytext=(6, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.set_ylabel("mean KL divergence vs reference (lower is better)")
    if pts and min(p["kld_mean"] for p in pts) > 0:
        ax.set_yscale("log")
    ax.set_title("Quality / speed / size (point area = bundle size)")
    ax.margins(x=0.35, y=0.2)  # room for the labels beside the points
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8, loc="best", markerscale=0.5)
    return _svg(fig)


def rss_svg(summary: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    rows = []  # (profile, entry id, peak RSS, budget)
    for e in summary["entries"]:
        budgets = {
            g["name"].split(".")[0]: g["threshold"]
            for g in e.get("gates", [])
            if g["kind"] == "budget" and g["name"].endswith("max_peak_rss_mb")
        }
        for r in e.get("bench") or []:
            if r.get("peak_rss_mb") is not None:
                rows.append((r["profile"], e["id"], r["peak_rss_mb"], budgets.get(r["profile"])))
    profiles = sorted({r[0] for r in rows})
    fig = Figure(figsize=(7.5, 1.2 + 2.2 * max(1, len(profiles))))
    for i, prof in enumerate(profiles or ["(no bench results)"]):
        ax = fig.add_subplot(max(1, len(profiles)), 1, i + 1)
        sel = [r for r in rows if r[0] == prof]
        ax.barh([r[1] for r in sel], [r[2] for r in sel], color="#9467bd")
        budget = next((r[3] for r in sel if r[3] is not None), None)
        if budget is not None:
            ax.axvline(budget, color="#d62728", linestyle="--", label=f"budget {budget:g} MiB")
            ax.legend(fontsize=8, loc="lower right")
        for y, r in enumerate(sel):
            ax.annotate(f"{r[2]:.0f}", (r[2], y), fontsize=7, xytext=(3, -3), textcoords="offset points")
        ax.set_title(f"peak RSS on {prof} (MiB)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _svg(fig)


def eval_selection(summary: dict[str, Any]) -> tuple[list[Any], Any]:
    """(candidates, Selection or None) over the entries with eval results: the front over all of
    them, the pick among the entries that passed every gate (no candidate: no pick)."""
    rows = [{**e["eval"], "name": e["id"], "format": e["format"]} for e in summary["entries"] if e.get("eval")]
    if not rows:
        return [], None
    cands = candidates_from(rows)
    sel = select(cands, Constraints(), raise_if_none=False)
    ok = {e["id"] for e in summary["entries"] if e.get("eval") and e["status"] == "ok"}
    passing = [c for c in cands if c.name in ok]
    pick = select(passing, Constraints(), raise_if_none=False).pick if passing else None
    return cands, dataclasses.replace(sel, pick=pick)


def accuracy_latency_svg(summary: dict[str, Any]) -> str:
    """Accuracy (with its 95 % interval) against p95 end-to-end latency, the Pareto front over
    (accuracy, p95, peak RSS, size) ringed, the pick starred."""
    from matplotlib.figure import Figure

    cands, sel = eval_selection(summary)
    intervals = {
        e["id"]: (e["eval"]["accuracy_low"], e["eval"]["accuracy_high"]) for e in summary["entries"] if e.get("eval")
    }
    pts = [c for c in cands if c.p95_ms is not None]
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    for c in pts:
        lo, hi = intervals[c.name]
        ax.errorbar(
            [c.p95_ms],
            [c.accuracy],
            yerr=[[c.accuracy - lo], [hi - c.accuracy]],
            fmt="o",
            capsize=3,
            color=format_color(c.format),
            alpha=POINT_ALPHA,
        )
        ax.annotate(c.name, (c.p95_ms, c.accuracy), fontsize=7, xytext=(6, 4), textcoords="offset points")
    front = sorted((c for c in pts if sel and c.name in sel.front), key=lambda c: c.p95_ms)
    if front:
        ax.plot(
            [c.p95_ms for c in front],
            [c.accuracy for c in front],
            "--",
            color="#2ca02c",
            zorder=0,
            label="Pareto front (accuracy, p95, RSS, size)",
        )
        ax.scatter(
            [c.p95_ms for c in front],
            [c.accuracy for c in front],
            s=260,
            facecolors="none",
            edgecolors="#2ca02c",
            linewidths=1.5,
        )
    pick = next((c for c in pts if sel and c.name == sel.pick), None)
    if pick is not None:
        ax.scatter(
            [pick.p95_ms],
            [pick.accuracy],
            marker="*",
            s=420,
            color="#ff7f0e",
            edgecolors="black",
            zorder=5,
            label=f"pick: {pick.name}",
        )
    for ref in {e["eval"]["reference_accuracy"] for e in summary["entries"] if e.get("eval")} - {None}:
        ax.axhline(ref, color="#7f7f7f", linestyle=":", label=f"reference {ref:.3f}")
    ax.set_xlabel("p95 end-to-end latency per request, ms (lower is better)")
    ax.set_ylabel("task accuracy (95 % Wilson interval)")
    ax.set_title("Accuracy / latency on the eval task set")
    ax.margins(x=0.35, y=0.2)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8, loc="best")
    return _svg(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.ok{color:#2a7}.gate_failed,.error{color:#c22;font-weight:bold}figure{margin:1.5em 0}"""


def render_html(summary: dict[str, Any]) -> str:
    esc = html.escape
    h = summary.get("host") or {}
    rows = []
    for e in summary["entries"]:
        p = e.get("parity") or {}
        for r in e.get("bench") or [{}]:
            cells = [
                e["id"],
                f'<span class="{esc(e["status"])}">{esc(e["status"])}</span>',
                _f(e.get("size_bytes") and e["size_bytes"] / 2**20, 1),
                _f(p.get("kld_mean"), 4),
                _f(p.get("top1_agreement"), 3),
                _f(p.get("ppl_ratio"), 3),
                esc(r.get("profile", "-")),
                _f(r.get("prefill_tok_s"), 1),
                _f(r.get("decode_tok_s"), 1),
                _f(r.get("ttft_ms"), 0),
                _f(r.get("peak_rss_mb"), 0),
            ]
            rows.append("<tr>" + "".join(f"<td>{c if c.startswith('<span') else esc(c)}</td>" for c in cells) + "</tr>")
    failures = [
        f"<li><b>{esc(e['id'])}</b>: {esc(e['message'] or e['status'])}</li>"
        for e in summary["entries"]
        if e["status"] != "ok"
    ]
    head = (
        "bundle",
        "status",
        "size MiB",
        "kld_mean",
        "top-1",
        "PPL ratio",
        "profile",
        "prefill tok/s",
        "decode tok/s",
        "TTFT ms",
        "peak RSS MiB",
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgekit build report</title><style>{_CSS}</style></head>
<body>
<h1>edgekit build report</h1>
<p>edgekit {esc(summary["edgekit_version"])}, built {esc(summary["created_at"])} from <code>{esc(Path(summary["config"]).name)}</code>
on {esc(str(h.get("cpu", "?")))} ({esc(str(h.get("logical_cores", "?")))} cores, {esc(str(h.get("os", "")))}).</p>
<table id="summary"><thead><tr>{"".join(f"<th>{c}</th>" for c in head)}</tr></thead><tbody>
{"".join(rows)}
</tbody></table>
{'<h2>Failures</h2><ul id="failures">' + "".join(failures) + "</ul>" if failures else '<p id="failures">Every gate passed.</p>'}
<h2>Trade-off</h2>
<figure id="tradeoff">{tradeoff_svg(points(summary))}</figure>
{_eval_section(summary)}
<h2>Memory against budgets</h2>
<figure id="rss">{rss_svg(summary)}</figure>
</body></html>
"""


def _eval_section(summary: dict[str, Any]) -> str:
    if not any(e.get("eval") for e in summary["entries"]):
        return ""
    _, sel = eval_selection(summary)
    pick = (
        f'<p id="pick">Pick (most accurate entry that passed every gate): <b>{html.escape(sel.pick)}</b></p>'
        if sel and sel.pick
        else '<p id="pick">No entry passed every gate: no pick.</p>'
    )
    return f"""<h2>Accuracy against latency</h2>
{pick}
<figure id="accuracy-latency">{accuracy_latency_svg(summary)}</figure>"""


def _f(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Render DIR/summary.json (from `edgekit build`) to `out` (default DIR/report.html)."""
    directory = Path(directory)
    summary = read_summary(directory, "report:").to_dict()
    out = Path(out) if out else directory / REPORT
    if not out.parent.is_dir():
        raise BadInput(f"--out {out}: directory {out.parent} does not exist", "Create it or choose another --out")
    write_text(out, render_html(summary))
    return out
