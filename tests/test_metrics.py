"""Parity metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgekit.metrics import greedy_match, log_softmax, position_stats, summarise


def test_log_softmax_matches_definition():
    x = np.array([[1.0, 2.0, 3.0]])
    expect = np.log(np.exp(x) / np.exp(x).sum())
    assert np.allclose(log_softmax(x), expect)


def test_identical_logits_have_zero_divergence():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7))
    s = summarise(position_stats(x, x.copy(), np.array([0, 1, 2, 3, 4])))
    assert s["kld_mean"] == pytest.approx(0.0, abs=1e-12)
    assert s["top1_agreement"] == 1.0 and s["ppl_ratio"] == pytest.approx(1.0)
    assert s["delta_p_mean"] == pytest.approx(0.0, abs=1e-12)


def test_two_token_hand_computed():
    # p_ref = (0.5, 0.5); p_bundle = (0.8, 0.2) via logits log(0.8), log(0.2)
    ref = np.log(np.array([[0.5, 0.5]]))
    bun = np.log(np.array([[0.8, 0.2]]))
    s = position_stats(ref, bun, np.array([1]))
    kld = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert s.kld[0] == pytest.approx(kld)
    assert s.nll_ref[0] == pytest.approx(-math.log(0.5))
    assert s.nll_bundle[0] == pytest.approx(-math.log(0.2))
    assert s.delta_p[0] == pytest.approx(0.2 - 0.5)
    # ties break to index 0 in both
    assert bool(s.top1_same[0]) is True


def test_summary_ppl_and_top1():
    ref = np.log(np.array([[0.9, 0.1], [0.2, 0.8]]))
    bun = np.log(np.array([[0.6, 0.4], [0.7, 0.3]]))
    s = summarise(position_stats(ref, bun, np.array([0, 1])))
    assert s["top1_agreement"] == 0.5
    assert s["ppl_ref"] == pytest.approx(math.exp(-(math.log(0.9) + math.log(0.8)) / 2))
    assert s["ppl_bundle"] == pytest.approx(math.exp(-(math.log(0.6) + math.log(0.3)) / 2))
    assert s["ppl_ratio"] == pytest.approx(s["ppl_bundle"] / s["ppl_ref"])


def test_padded_vocab_is_cut_to_common_width():
    ref = np.log(np.array([[0.25, 0.75]]))
    bun = np.concatenate([ref, [[-1e9]]], axis=1)
    assert position_stats(ref, bun, np.array([1])).kld[0] == pytest.approx(0.0, abs=1e-9)


def test_greedy_match():
    assert greedy_match([1, 2, 3], [1, 2, 4]) == 2
    assert greedy_match([1, 2], [1, 2, 3]) == 2
    assert greedy_match([5], [6]) == 0
