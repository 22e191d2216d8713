"""edgekit select: which bundle ships, from eval results and the user's constraints.

    candidates = candidates_from(eval records)      # accuracy, p95 e2e latency, peak RSS, size
    front = non-dominated set over (accuracy up, p95 down, RSS down, size down)
    pick = most accurate feasible candidate; ties: lower peak RSS, then smaller
    every other candidate: the constraints it breaks (with its figure), or who dominates it,
    or why the pick beat it

No feasible candidate raises GateFailed (exit 3) naming the nearest miss: the candidate whose
relative excess over its broken constraints is smallest.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput, GateFailed
from .evaluate import evaluate_bundles, stored_record
from .progress import Progress
from .tasks import load_tasks


@dataclass(frozen=True)
class Constraints:
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None  # reference accuracy - bundle accuracy
    max_p95_ms: float | None = None  # p95 end-to-end latency per request
    max_rss_mb: float | None = None
    max_size_mb: float | None = None

    def check(self) -> None:
        for name, v in dataclasses.asdict(self).items():
            if v is None:
                continue
            if v < 0 or (name in ("min_accuracy", "max_accuracy_drop") and v > 1):
                bound = "between 0 and 1" if name in ("min_accuracy", "max_accuracy_drop") else "positive"
                raise BadInput(f"--{name.replace('_', '-')} must be {bound}, got {v}", "Fix the constraint")


@dataclass(frozen=True)
class Candidate:
    name: str
    format: str
    accuracy: float
    accuracy_drop: float | None  # None: no reference row
    p95_ms: float | None  # None: no generation items
    peak_rss_mb: float
    size_mb: float


@dataclass(frozen=True)
class Verdict:
    name: str
    feasible: bool
    on_front: bool
    picked: bool
    broken: tuple[str, ...]  # constraints missed, each with its figure
    reason: str  # why it was picked or why it lost
    candidate: Candidate


@dataclass(frozen=True)
class Selection:
    pick: str | None
    front: tuple[str, ...]
    verdicts: tuple[Verdict, ...]
    constraints: Constraints

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def candidates_from(records: Iterable[Any]) -> list[Candidate]:
    """EvalRecords, or their summary dicts (manifest["eval"], `edgekit eval --json`)."""
    out = []
    for r in records:
        d = r.summary() if hasattr(r, "summary") else r
        drop = None if d.get("accuracy_delta") is None else round(-d["accuracy_delta"], 4)
        out.append(
            Candidate(
                name=d["name"],
                format=d["format"],
                accuracy=d["accuracy"],
                accuracy_drop=drop,
                p95_ms=d.get("e2e_ms_p95"),
                peak_rss_mb=d["peak_rss_mb"],
                size_mb=round((d.get("size_bytes") or 0) / 2**20, 2),
            )
        )
    if not out:
        raise BadInput("no eval results to select from", "Pass bundles (or --from an `edgekit eval --json` file)")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise BadInput("the same bundle appears twice among the eval results", "Pass each bundle once")
    return out


def load_eval_json(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        bundles = doc["bundles"]
        if not isinstance(bundles, list):
            raise TypeError
        for b in bundles:
            for key in ("name", "format", "accuracy", "peak_rss_mb"):
                b[key]  # noqa: B018 - presence check
    except FileNotFoundError:
        raise BadInput(f"--from {p} does not exist", "Pass the output of `edgekit eval --json`") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(
            f"--from {p} is not an `edgekit eval --json` document ({type(e).__name__}: {e})",
            "Pass the output of `edgekit eval --json`",
        ) from None
    return bundles


def dominates(a: Candidate, b: Candidate) -> bool:
    """a is at least as good on every axis and better on one (a missing latency is the worst)."""
    inf = float("inf")
    pa, pb = (inf if a.p95_ms is None else a.p95_ms), (inf if b.p95_ms is None else b.p95_ms)
    ge = a.accuracy >= b.accuracy and pa <= pb and a.peak_rss_mb <= b.peak_rss_mb and a.size_mb <= b.size_mb
    gt = a.accuracy > b.accuracy or pa < pb or a.peak_rss_mb < b.peak_rss_mb or a.size_mb < b.size_mb
    return ge and gt


def pareto_front(cands: Sequence[Candidate]) -> list[Candidate]:
    return [c for c in cands if not any(dominates(o, c) for o in cands if o is not c)]


def broken(c: Candidate, k: Constraints) -> list[tuple[str, float]]:
    """(text, relative excess) for each constraint c misses."""
    out = []

    def miss(text: str, value: float, limit: float) -> None:
        out.append((text, abs(value - limit) / max(abs(limit), 1e-9)))

    if k.min_accuracy is not None and c.accuracy < k.min_accuracy:
        miss(f"accuracy {c.accuracy:.3f} < min {k.min_accuracy:g}", c.accuracy, k.min_accuracy)
    if k.max_accuracy_drop is not None:
        if c.accuracy_drop is None:
            out.append(("accuracy drop unknown (evaluated without a reference)", 1.0))
        elif c.accuracy_drop > k.max_accuracy_drop:
            out.append(
                (
                    f"accuracy drop {c.accuracy_drop:.3f} > max {k.max_accuracy_drop:g}",
                    c.accuracy_drop - k.max_accuracy_drop,
                )
            )
    if k.max_p95_ms is not None:
        if c.p95_ms is None:
            out.append(("p95 latency unknown (no generation items)", 1.0))
        elif c.p95_ms > k.max_p95_ms:
            miss(f"p95 e2e {c.p95_ms:.0f} ms > max {k.max_p95_ms:g}", c.p95_ms, k.max_p95_ms)
    if k.max_rss_mb is not None and c.peak_rss_mb > k.max_rss_mb:
        miss(f"peak RSS {c.peak_rss_mb:.0f} MiB > max {k.max_rss_mb:g}", c.peak_rss_mb, k.max_rss_mb)
    if k.max_size_mb is not None and c.size_mb > k.max_size_mb:
        miss(f"size {c.size_mb:.1f} MiB > max {k.max_size_mb:g}", c.size_mb, k.max_size_mb)
    return out


def _rank(c: Candidate) -> tuple[float, float, float]:
    return (-c.accuracy, c.peak_rss_mb, c.size_mb)


def select(cands: Sequence[Candidate], constraints: Constraints, *, raise_if_none: bool = True) -> Selection:
    front = pareto_front(cands)
    misses = {c.name: broken(c, constraints) for c in cands}
    feasible = [c for c in cands if not misses[c.name]]
    pick = min(feasible, key=_rank) if feasible else None
    verdicts = []
    for c in cands:
        dominated_by = [o for o in cands if dominates(o, c)]
        if pick is not None and c is pick:
            reason = "picked: the most accurate bundle that meets every constraint"
        elif misses[c.name]:
            reason = "breaks " + "; ".join(t for t, _ in misses[c.name])
            if dominated_by:
                reason += f"; also dominated by {Path(min(dominated_by, key=_rank).name).name}"
        elif dominated_by:
            by = pick if pick in dominated_by else min(dominated_by, key=_rank)
            reason = f"dominated by {Path(by.name).name}"
        elif pick is None:  # unreachable: with no pick every candidate misses a constraint
            reason = "no bundle meets every constraint"
        elif c.accuracy < pick.accuracy:
            reason = f"less accurate than {Path(pick.name).name} ({c.accuracy:.3f} < {pick.accuracy:.3f})"
        else:
            reason = (
                f"as accurate as {Path(pick.name).name}; loses the tie on peak RSS, then size "
                f"({c.peak_rss_mb:.0f} vs {pick.peak_rss_mb:.0f} MiB, {c.size_mb:.1f} vs {pick.size_mb:.1f} MiB)"
            )
        verdicts.append(
            Verdict(
                name=c.name,
                feasible=not misses[c.name],
                on_front=c in front,
                picked=pick is not None and c is pick,
                broken=tuple(t for t, _ in misses[c.name]),
                reason=reason,
                candidate=c,
            )
        )
    selection = Selection(
        pick=pick.name if pick else None,
        front=tuple(c.name for c in front),
        verdicts=tuple(verdicts),
        constraints=constraints,
    )
    if pick is None and raise_if_none:
        nearest = min(cands, key=lambda c: (sum(x for _, x in misses[c.name]), _rank(c)))
        raise NoFeasibleBundle(
            f"no bundle meets the constraints; nearest miss: {Path(nearest.name).name} "
            f"({'; '.join(t for t, _ in misses[nearest.name])})",
            "Relax a constraint or export a bigger or faster bundle",
            selection,
        )
    return selection


class NoFeasibleBundle(GateFailed):
    """GateFailed that still carries the selection, so the CLI can print why each lost."""

    def __init__(self, problem: str, fix: str, selection: Selection):
        super().__init__(problem, fix)
        self.selection = selection


def select_bundles(
    records: Sequence[Any] | None = None,
    *,
    bundles: Sequence[str | Path] = (),
    from_json: str | Path | None = None,
    stored: bool = False,
    tasks: str | Path | None = None,
    limit: int | None = None,
    min_accuracy: float | None = None,
    max_accuracy_drop: float | None = None,
    max_p95_ms: float | None = None,
    max_rss_mb: float | None = None,
    max_size_mb: float | None = None,
    progress: Progress | None = None,
    **eval_kwargs: Any,
) -> Selection:
    """The Pareto set over (accuracy up, p95 end-to-end latency down, peak RSS down, size down)
    and the pick: the most accurate bundle that meets every constraint (ties: lower RSS, then
    smaller). Candidates come from `records` (EvalRecords or their summaries), from `from_json`
    (an `edgekit eval --json` document), from the bundles' manifests (stored=True, for the task
    file given), or else from a fresh evaluate_bundles(bundles, tasks=...). Returns a Selection;
    no feasible bundle raises GateFailed (exit 3) naming the nearest miss."""
    constraints = Constraints(
        min_accuracy=min_accuracy,
        max_accuracy_drop=max_accuracy_drop,
        max_p95_ms=max_p95_ms,
        max_rss_mb=max_rss_mb,
        max_size_mb=max_size_mb,
    )
    constraints.check()
    if records is None:
        if from_json is not None:
            records = load_eval_json(from_json)
        elif stored:
            from .bench import discover_bundles  # the benchmark child's __main__: loaded on use only

            key = load_tasks(tasks, limit=limit).key
            records = []
            for b in bundles or discover_bundles():
                rec = stored_record(b, key)
                if rec is None:
                    raise BadInput(
                        f"{b} has no stored eval for {key}",
                        "Run edgekit eval on it first, or drop --stored to evaluate now",
                    )
                records.append(rec)
        else:
            records = list(
                evaluate_bundles(bundles, tasks=tasks, limit=limit, progress=progress, **eval_kwargs).bundles
            )
    return select(candidates_from(records), constraints)


def print_selection(sel: Selection) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
    table = Table(title="edgekit select", title_justify="left")
    for col in ("bundle", "accuracy", "drop", "p95 e2e ms", "peak RSS MiB", "size MiB", "front", "verdict"):
        table.add_column(col, justify="left" if col in ("bundle", "verdict") else "right")
    for v in sel.verdicts:
        c = v.candidate
        table.add_row(
            Path(c.name).name,
            f"{c.accuracy:.3f}",
            "-" if c.accuracy_drop is None else f"{c.accuracy_drop:+.3f}",
            "-" if c.p95_ms is None else f"{c.p95_ms:.0f}",
            f"{c.peak_rss_mb:.0f}",
            f"{c.size_mb:.1f}",
            "yes" if v.on_front else "",
            ("PICK: " if v.picked else "") + v.reason,
        )
    console.print(table)
