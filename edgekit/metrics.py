"""Parity metrics as pure numpy functions over (reference, bundle) logits.

Definitions follow llama.cpp's perplexity tool (--kl-divergence) so figures can be compared
with its published tables: KL divergence is KL(reference || bundle) per position; delta_p
is the change in the probability of the correct next token, bundle minus reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (float32 loses the small tail terms KLD needs)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class PositionStats:
    """Per-position figures for one window; concatenated across windows before summarising."""

    kld: np.ndarray  # KL(ref || bundle) per position
    top1_same: np.ndarray  # bool: both argmaxes equal
    nll_ref: np.ndarray  # -log p_ref(correct token)
    nll_bundle: np.ndarray  # -log p_bundle(correct token)
    delta_p: np.ndarray  # p_bundle(correct) - p_ref(correct)


def position_stats(ref_logits: np.ndarray, bundle_logits: np.ndarray, targets: np.ndarray) -> PositionStats:
    """ref_logits, bundle_logits: [n, vocab]; targets: [n] ids of the next token at each position.

    Vocabularies may differ in padding rows (an exporter can pad the embedding): both are cut
    to the shorter width, which is exact when the padded rows are never-used tokens.
    """
    v = min(ref_logits.shape[-1], bundle_logits.shape[-1])
    lr = log_softmax(ref_logits[:, :v])
    lb = log_softmax(bundle_logits[:, :v])
    pr = np.exp(lr)
    kld = np.sum(pr * (lr - lb), axis=-1)
    idx = np.arange(len(targets))
    nll_r = -lr[idx, targets]
    nll_b = -lb[idx, targets]
    return PositionStats(
        kld=np.maximum(kld, 0.0),  # tiny negative values are rounding
        top1_same=lr.argmax(-1) == lb.argmax(-1),
        nll_ref=nll_r,
        nll_bundle=nll_b,
        delta_p=np.exp(-nll_b) - np.exp(-nll_r),
    )


def concat(stats: list[PositionStats]) -> PositionStats:
    return PositionStats(*(np.concatenate([getattr(s, f) for s in stats]) for f in PositionStats.__dataclass_fields__))


def summarise(s: PositionStats) -> dict[str, float]:
    ppl_ref = float(np.exp(s.nll_ref.mean()))
    ppl_bundle = float(np.exp(s.nll_bundle.mean()))
    return {
        "positions": int(len(s.kld)),
        "kld_mean": float(s.kld.mean()),
        "kld_p99": float(np.percentile(s.kld, 99)),
        "kld_max": float(s.kld.max()),
        "top1_agreement": float(s.top1_same.mean()),
        "ppl_ref": ppl_ref,
        "ppl_bundle": ppl_bundle,
        "ppl_ratio": ppl_bundle / ppl_ref,
        "delta_p_mean": float(s.delta_p.mean()),
        "delta_p_p1": float(np.percentile(s.delta_p, 1)),
        "delta_p_p99": float(np.percentile(s.delta_p, 99)),
    }


def greedy_match(reference: list[int], candidate: list[int]) -> int:
    """How many leading tokens two greedy continuations share before they diverge."""
    n = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        n += 1
    return n
