"""GPTQ (edgekit.formats.onnx_int4.gptq) against a direct least-squares reference.

The reference does what GPTQ's Cholesky bookkeeping stands for, the slow way: after each input
column is rounded, every later column is re-solved by np.linalg.lstsq for the least output error
given all the columns rounded so far. Same grid choice (quantize_blocks on the block's current
weights), so the codes must come out the same.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.formats.onnx_int4.gptq import gptq_blocks, inverse_cholesky
from edgekit.formats.onnx_int4.requant import quantize_blocks


def _inputs(seed: int, tokens: int, k: int) -> np.ndarray:
    """Correlated input columns (a random mixing of a few sources), as a layer's inputs are."""
    rng = np.random.default_rng(seed)
    sources = rng.standard_normal((tokens, max(2, k // 3)))
    mix = rng.standard_normal((sources.shape[1], k))
    return sources @ mix + 0.3 * rng.standard_normal((tokens, k))


def _weights(seed: int, n: int, k: int) -> np.ndarray:
    return np.random.default_rng(seed + 100).standard_normal((n, k)).astype(np.float32)


def _dequantized(q, scale, zp, k) -> np.ndarray:
    w = (q.astype(np.float64) - zp[..., None].astype(np.float64)) * scale[..., None].astype(np.float64)
    return w.reshape(q.shape[0], -1)[:, :k]


def _reference(w, x, bits, block, zero_points):
    """Column by column: round on the block's grid, then lstsq for every later column."""
    n, k = w.shape
    w = w.astype(np.float64)
    h = x.T @ x / len(x)
    importance = np.diag(h).astype(np.float32)
    maxq = 2**bits - 1
    cur = w.copy()
    deq = np.zeros_like(w)
    codes = np.zeros((n, k), dtype=np.uint8)
    for col in range(k):
        g, j = divmod(col, block)
        if j == 0:
            _, s, z = quantize_blocks(
                cur[:, col : col + block], bits, block, importance[col : col + block], zero_points
            )
            scale, zp = s[:, 0].astype(np.float64), z[:, 0].astype(np.float64)
        lv = np.clip(np.rint(cur[:, col] / scale + zp), 0, maxq)
        codes[:, col] = lv
        deq[:, col] = (lv - zp) * scale
        if col + 1 < k:
            # output error of the columns fixed so far, [tokens, N]; the rest absorbs what it can
            r = x[:, : col + 1] @ (w[:, : col + 1] - deq[:, : col + 1]).T
            cur[:, col + 1 :] = w[:, col + 1 :] + np.linalg.lstsq(x[:, col + 1 :], r, rcond=None)[0].T
    return codes


@pytest.mark.parametrize("zero_points", ["integer", "float"])
@pytest.mark.parametrize("n,k,block,bits", [(5, 16, 8, 4), (4, 24, 8, 4), (3, 16, 16, 8)])
def test_codes_equal_the_least_squares_reference(n, k, block, bits, zero_points):
    x = _inputs(k, 400, k)
    w = _weights(k, n, k)
    h = x.T @ x / len(x)
    q, _, _ = gptq_blocks(w, h, bits, block, zero_points, damp=0.0, lazy=block, dtype="float64")
    expected = _reference(w, x, bits, block, zero_points)
    assert np.array_equal(q.reshape(n, -1)[:, :k], expected)


def test_lazy_batches_do_not_change_the_result():
    x = _inputs(1, 300, 64)
    w = _weights(1, 6, 64)
    h = x.T @ x / len(x)
    one = gptq_blocks(w, h, 4, 16, lazy=16, dtype="float64")
    batched = gptq_blocks(w, h, 4, 16, lazy=64, dtype="float64")
    for a, b in zip(one, batched):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("zero_points", ["integer", "float"])
def test_output_error_below_the_blockwise_search(zero_points):
    """On correlated inputs GPTQ's output error ||(W - Q) X|| is well below the imatrix-weighted
    search's, which rounds each block on its own (what weight_search = "imatrix" does)."""
    k, n = 96, 32
    x = _inputs(7, 2000, k)
    w = _weights(7, n, k)
    h = x.T @ x / len(x)
    g = gptq_blocks(w, h, 4, 32, zero_points)
    b = quantize_blocks(w, 4, 32, np.diag(h).astype(np.float32), zero_points)

    def out_err(codes):
        return float(np.linalg.norm((w - _dequantized(*codes, k)) @ x.T))

    assert out_err(g) < 0.8 * out_err(b)
    # and it is not a better output bought with a wild weight: the weights stay near the originals
    assert np.abs(_dequantized(*g, k) - w).max() < 4 * np.abs(w).max() / 15


def test_padded_columns_and_dead_inputs():
    """K not a multiple of the block: padded with zero weights; an input column no token drives
    (diag 0) is rounded to nearest and moves nothing."""
    k, n = 40, 4
    x = _inputs(3, 300, k)
    x[:, 5] = 0.0
    w = _weights(3, n, k)
    h = x.T @ x / len(x)
    q, s, z = gptq_blocks(w, h, 4, 32)
    assert q.shape == (n, 2, 32) and s.shape == (n, 2)
    assert np.array_equal(q[:, 1, 8:], np.broadcast_to(z[:, 1:2], (n, 24)))  # padding dequantizes to 0
    assert np.isfinite(_dequantized(q, s, z, k)).all()


def test_inverse_cholesky_is_the_factor_of_the_inverse():
    x = _inputs(5, 200, 12)
    h = x.T @ x / len(x)
    u = inverse_cholesky(h, damp=0.0)
    assert np.allclose(np.triu(u), u)
    assert np.allclose(u.T @ u, np.linalg.inv(h), rtol=1e-6, atol=1e-8)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="input columns"):
        gptq_blocks(np.zeros((2, 8), np.float32), np.eye(4), 4, 8)
