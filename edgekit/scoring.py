"""Figures for `edgekit eval`, as small exact formulas (no scipy: it is not in the pinned set).

- wilson: the 95 % Wilson score interval for a proportion (Wilson 1927), which, unlike the
  normal approximation, stays inside [0, 1] and is sensible at 0 or n successes.
- mcnemar_exact: two-sided exact McNemar test, the binomial test of the discordant pairs
  against p = 1/2: p = min(1, 2 * P(X <= min(b, c))), X ~ Binomial(b + c, 1/2).
- flips: items whose correctness differs from the reference's, in both directions.
- ece: expected calibration error over 10 equal-width confidence bins (the last bin closed).
- paraphrase_drop: accuracy on each group's first item minus accuracy on the group's others.
- format_sensitivity: max - min accuracy across item formats, over groups asked in 2+ formats.
- percentile: linear interpolation between closest ranks (numpy's default, Hyndman-Fan type 7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """b: items right for the reference only; c: right for the bundle only."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Flips:
    n: int
    lost: int  # right for the reference, wrong for the bundle
    gained: int  # wrong for the reference, right for the bundle

    @property
    def rate(self) -> float:
        return (self.lost + self.gained) / self.n if self.n else 0.0

    @property
    def mcnemar_p(self) -> float:
        return mcnemar_exact(self.lost, self.gained)


def flips(reference: Sequence[bool], bundle: Sequence[bool]) -> Flips:
    if len(reference) != len(bundle):
        raise ValueError("flips need the same items on both sides")
    lost = sum(1 for r, b in zip(reference, bundle) if r and not b)
    gained = sum(1 for r, b in zip(reference, bundle) if b and not r)
    return Flips(len(bundle), lost, gained)


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float | None:
    """sum over bins of |bin| / n * |accuracy(bin) - mean confidence(bin)|; None without items."""
    if not confidence:
        return None
    counts, conf_sum, right = [0] * bins, [0.0] * bins, [0] * bins
    for c, ok in zip(confidence, correct):
        i = min(int(c * bins), bins - 1)  # 1.0 falls into the last bin
        counts[i] += 1
        conf_sum[i] += c
        right[i] += bool(ok)
    n = len(confidence)
    return sum(abs(right[i] / counts[i] - conf_sum[i] / counts[i]) * counts[i] / n for i in range(bins) if counts[i])


def _accuracy(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(values: Sequence[bool]) -> float:
    """Accuracy of a list the caller knows is not empty."""
    return sum(values) / len(values)


def paraphrase_drop(groups: Sequence[Sequence[bool]]) -> float | None:
    """groups: correctness per group in file order. Accuracy over the first items of groups
    with 2+ items, minus accuracy over the other items of those groups; None without such groups."""
    multi = [g for g in groups if len(g) >= 2]
    if not multi:
        return None
    return _share([g[0] for g in multi]) - _share([x for g in multi for x in g[1:]])  # each group has 2+ items


def format_sensitivity(items: Sequence[tuple[str, str, bool]]) -> float | None:
    """items: (group, format, correct). Max minus min accuracy across formats, counting only
    groups asked in at least two formats (so each format answers the same questions); None
    when no group has two formats."""
    formats_of: dict[str, set[str]] = {}
    for group, fmt, _ in items:
        formats_of.setdefault(group, set()).add(fmt)
    per_format: dict[str, list[bool]] = {}
    for group, fmt, ok in items:
        if len(formats_of[group]) >= 2:
            per_format.setdefault(fmt, []).append(ok)
    if len(per_format) < 2:
        return None
    accs = [_share(v) for v in per_format.values()]  # setdefault(...).append: never empty
    return max(accs) - min(accs)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def softmax(scores: Sequence[float]) -> list[float]:
    m = max(scores)
    e = [math.exp(s - m) for s in scores]
    total = sum(e)
    return [x / total for x in e]


def continuation_logprob(logits: np.ndarray, ids: Sequence[int], n_context: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= n_context, from teacher-forced logits
    [len(ids), vocab] (row i predicts token i + 1). Rows are log-softmaxed in float64."""
    import numpy as np

    rows = np.asarray(logits[n_context - 1 : len(ids) - 1], dtype=np.float64)
    rows = rows - rows.max(axis=-1, keepdims=True)
    logp = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    targets = np.asarray(ids[n_context:])
    return float(logp[np.arange(len(targets)), targets].sum())
