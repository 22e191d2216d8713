"""edgekit.scoring against values computed by hand (worked out in the comments)."""

from __future__ import annotations

import math

import pytest

from edgekit import scoring


def test_wilson_against_hand_values():
    # 8 of 10, z = 1.96: p = .8, z^2/n = .38416, denom = 1.38416,
    # centre = (.8 + .19208) / 1.38416 = .71682, half = 1.96 * sqrt(.016 + .009604) / 1.38416 = .22658
    lo, hi = scoring.wilson(8, 10)
    assert lo == pytest.approx(0.4901625, abs=1e-6) and hi == pytest.approx(0.9433178, abs=1e-6)
    # 0 of 10: the interval starts at 0 and ends at z^2/(n + z^2) = 3.8415/13.8415 = .27753
    lo, hi = scoring.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775328, abs=1e-6)
    # 10 of 10 mirrors it
    lo, hi = scoring.wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.2775328, abs=1e-6)
    assert scoring.wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_against_hand_values():
    # b=1, c=5: n=6, P(X<=1) = (1 + 6) / 64 = 7/64, two-sided 14/64
    assert scoring.mcnemar_exact(1, 5) == pytest.approx(14 / 64)
    assert scoring.mcnemar_exact(5, 1) == pytest.approx(14 / 64)
    # b=0, c=6: 2 * 1/64
    assert scoring.mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    # balanced discordance can't be significant: capped at 1
    assert scoring.mcnemar_exact(3, 3) == 1.0
    assert scoring.mcnemar_exact(0, 0) == 1.0
    # b=2, c=10: (1 + 12 + 66) / 4096 * 2 = 158/4096
    assert scoring.mcnemar_exact(2, 10) == pytest.approx(158 / 4096)


def test_flips_both_directions():
    ref = [True, True, False, False, True, True]
    bun = [True, False, True, False, False, True]
    f = scoring.flips(ref, bun)
    assert (f.n, f.lost, f.gained) == (6, 2, 1)
    assert f.rate == pytest.approx(3 / 6)
    assert f.mcnemar_p == pytest.approx(1.0)  # b=2, c=1: 2 * (1 + 3)/8 = 1
    with pytest.raises(ValueError):
        scoring.flips([True], [True, False])


def test_ece_ten_equal_width_bins():
    # bin [0.9, 1.0]: confidences .95, 1.0 (1.0 goes to the last bin), both right: |1 - .975| = .025, weight 2/4
    # bin [0.6, 0.7): .65 wrong: |0 - .65| = .65, weight 1/4; bin [0.3, 0.4): .35 right: |1 - .35| = .65, weight 1/4
    got = scoring.ece([0.95, 1.0, 0.65, 0.35], [True, True, False, True])
    assert got == pytest.approx(0.5 * 0.025 + 0.25 * 0.65 + 0.25 * 0.65)
    # perfectly calibrated: confidence .5, half right, same bin
    assert scoring.ece([0.5, 0.5], [True, False]) == pytest.approx(0.0)
    assert scoring.ece([], []) is None


def test_paraphrase_drop_first_variant_minus_others():
    groups = [[True, False, False], [True, True], [False, True], [True]]  # the single item is ignored
    # firsts: T, T, F -> 2/3; others: F, F, T, T -> 2/4
    assert scoring.paraphrase_drop(groups) == pytest.approx(2 / 3 - 0.5)
    assert scoring.paraphrase_drop([[True]]) is None


def test_format_sensitivity_over_groups_with_two_formats():
    items = [
        ("a", "raw/contains", True),
        ("a", "chat/contains", False),
        ("b", "raw/contains", True),
        ("b", "chat/contains", True),
        ("c", "chat/contains", False),
    ]  # group c has one format: not counted
    # raw: 2/2, chat: 1/2 -> 0.5
    assert scoring.format_sensitivity(items) == pytest.approx(0.5)
    assert scoring.format_sensitivity([("a", "raw/exact", True), ("a", "raw/exact", False)]) is None


def test_percentile_linear_interpolation():
    xs = [10, 20, 30, 40, 50]
    assert scoring.percentile(xs, 50) == 30
    assert scoring.percentile(xs, 95) == pytest.approx(48.0)  # h = 4 * .95 = 3.8 -> 40 + .8 * 10
    assert scoring.percentile(xs, 100) == 50
    assert scoring.percentile([7], 95) == 7
    assert scoring.percentile([], 50) is None
    import numpy as np

    vals = [3.1, 0.2, 9.9, 4.4, 5.0, 1.7, 8.8]
    assert scoring.percentile(vals, 95) == pytest.approx(float(np.percentile(vals, 95)))


def test_softmax_and_continuation_logprob():
    import numpy as np

    p = scoring.softmax([math.log(1), math.log(3)])
    assert p == pytest.approx([0.25, 0.75])
    # vocab of 2; row i predicts token i+1. ids = [0, 1, 0], context 1: log p(1|row0) + log p(0|row1)
    logits = np.array([[0.0, math.log(3)], [math.log(4), 0.0], [0.0, 0.0]])
    want = math.log(3 / 4) + math.log(4 / 5)
    assert scoring.continuation_logprob(logits, [0, 1, 0], 1) == pytest.approx(want)
    assert scoring.continuation_logprob(logits, [0, 1, 0], 2) == pytest.approx(math.log(4 / 5))
