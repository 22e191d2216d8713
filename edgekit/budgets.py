"""The bench stage's gate: a benchmark record against its device profile's budgets
(peak RSS, bundle size, decode speed), as `Gate` records, and the figures a build keeps."""

from __future__ import annotations

from typing import Any

from .gates import Gate
from .targets import load_targets

# budget key -> (how the record's figure is read, the operator that passes)
BUDGETS = {
    "max_peak_rss_mb": (lambda r: r.peak_rss_mb, "<="),  # the child's VmHWM, MiB
    "max_bundle_mb": (lambda r: round(r.bundle_bytes / 2**20, 1), "<="),  # every file of the bundle, MiB
    "min_decode_tok_s": (lambda r: r.decode_tok_s, ">="),  # median over the reps
}

# What summary.json keeps of a BenchRecord per profile (report and select read these keys).
SUMMARY_KEYS = (
    "profile",
    "host_id",
    "load_s",
    "ttft_ms",
    "prefill_tok_s",
    "decode_tok_s",
    "decode_tok_s_stddev",
    "peak_rss_mb",
    "bandwidth_utilization",
    "threads",
    "prompt_tokens",
    "gen_tokens",
    "reps",
    "substitutions",
)


def gates_for(record: Any, profile: str, limits: dict[str, float | None]) -> list[Gate]:
    """One gate per budget that has a limit; an unset budget is not checked. The one evaluator
    for budgets: bench's own verdict and build's gates both come from here."""
    return [
        Gate.check("budget", f"{profile}.{key}", figure(record), op, limit)
        for key, (figure, op) in BUDGETS.items()
        if (limit := limits.get(key)) is not None
    ]


def budget_gates(record: Any, profile: str, overrides: dict[str, float]) -> list[Gate]:
    """The profile's budgets (or a build's overrides of them) against a record."""
    p = load_targets().profile(profile)
    return gates_for(record, profile, {key: overrides.get(key, getattr(p, key)) for key in BUDGETS})


def bench_summary(record: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v := getattr(record, k), tuple) else v) for k in SUMMARY_KEYS}
