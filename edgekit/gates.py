"""One gate record for every threshold edgekit checks: parity, bench budgets, eval limits,
build regressions against a baseline. One type means one way to print, store and count them."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}

Figure = float | int | bool | None


@dataclass(frozen=True)
class Gate:
    kind: str  # "parity" | "budget" | "eval" | "regression" | "long_context"
    name: str  # e.g. "kld_mean", "laptop-cpu.max_peak_rss_mb", "eval.accuracy_drop"
    figure: Figure  # the measured value; None = could not be measured (fails)
    op: str  # "<=", ">=", "=="
    threshold: float | int | bool
    passed: bool
    baseline: Figure = None  # regression gates: the baseline's figure
    delta: float | None = None  # regression gates: figure - baseline

    @classmethod
    def check(
        cls, kind: str, name: str, figure: Figure, op: str, threshold: float | int | bool, baseline: Figure = None
    ) -> Gate:
        """Evaluate a gate. A figure that could not be measured fails rather than passing unseen."""
        if op not in _OPS:
            raise ValueError(f"unknown gate operator {op!r}")
        passed = figure is not None and bool(_OPS[op](figure, threshold))
        delta = None
        if baseline is not None and figure is not None and not isinstance(figure, bool):
            delta = round(float(figure) - float(baseline), 6)
        return cls(kind, name, figure, op, threshold, passed, baseline, delta)

    def text(self) -> str:
        """One line for a user: what failed and against what."""
        fig = "unmeasured" if self.figure is None else _fmt(self.figure)
        base = f" (baseline {_fmt(self.baseline)})" if self.baseline is not None else ""
        verdict = "passes" if self.passed else "fails"
        return f"{self.name} {fig}{base} {verdict} {self.op} {_fmt(self.threshold)}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # baseline/delta only where they mean something, as the summary JSON has always been written
        for k in ("baseline", "delta"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gate:
        return cls(
            d["kind"],
            d["name"],
            d.get("figure"),
            d["op"],
            d["threshold"],
            bool(d["passed"]),
            d.get("baseline"),
            d.get("delta"),
        )


def failed(gates: Iterable[Gate]) -> list[Gate]:
    return [g for g in gates if not g.passed]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
