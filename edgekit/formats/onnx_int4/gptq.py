"""Error-compensating blockwise quantization (GPTQ, Frantar et al. 2022), in numpy.

requant.quantize_blocks() rounds every block on its own: the error it minimises is the
weight's, weighted per input column by the importance matrix. What a layer's output sees is
(W - Q) X: with correlated input columns, a rounding error on one column can be partly undone
by moving the not-yet-rounded weights of the columns that move with it. GPTQ does that in one
pass over the input columns: round column j, then shift every later column by the least-squares
correction, read off the Cholesky factor of the inverse of H = X^T X / n (the inputs' second
moments over the calibration text, edgekit.activations).

The grid is MatMulNBits': blocks of `block` input columns along K, one scale and zero point per
block and output row. A block's scale and zero point are chosen when the pass reaches its first
column, by quantize_blocks' search on the block's weights as the earlier corrections left them
(weighted by diag(H), the imatrix statistic); then its columns are rounded one at a time on
that grid. Columns are taken in their natural order (no act-order), so the grid and the packed
layout stay MatMulNBits' own.

tests/test_gptq.py checks the result against a direct least-squares reference: after each
column is rounded, the later columns solve the least-squares problem for the output error
explicitly (np.linalg.lstsq), and the codes must be the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .requant import quantize_blocks

if TYPE_CHECKING:
    import numpy as np

# Dampening added to H's diagonal, as a fraction of its mean. GPTQ's own default is 0.01, for
# 128 x 2048 calibration tokens; edgekit's calibration text is ~1800 tokens, fewer than the
# inputs of a 3B model's down projection (8192), so H is singular there and corrections fitted
# to it overfit the text. Measured end to end (benchmarks/gptq_damp.py: weights replaced by their
# dequantized codes, mean KLD on the evaluation text): Gemma 3 270M, float minimums: imatrix
# search 0.0637, GPTQ 0.0623 at 0.01, 0.0457 at 0.1, 0.0427 at 0.3, 0.0500 at 1.0; SmolLM2,
# integer zero points: 0.178, and 0.210 / 0.183 / 0.191 / 0.182.
DAMP = 0.3
# Columns updated together before the rest of the matrix is (GPTQ's "lazy batch"): one BLAS
# product per LAZY columns instead of a rank-1 update of the whole matrix per column.
LAZY = 128


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper-triangular U with U^T U = (H + damp * mean(diag H) * I)^-1, in H's dtype.

    Columns no calibration token drives (diag 0) get a unit diagonal: their weights are
    rounded to nearest and take no correction (nothing measured says where to move them)."""
    import numpy as np

    h = np.array(h, copy=True)
    diag = np.einsum("ii->i", h)  # a view: writes go to h
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    # Two K x K arrays at a time (1.2 GiB each for a 14B model's 17920-wide down projection,
    # on each of the two worker threads): H, then its inverse, then the factor.
    h_inv = np.linalg.inv(h)  # symmetric positive definite after the dampening
    del h, diag
    return np.linalg.cholesky(h_inv).T


def gptq_blocks(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block: int,
    zero_points: str = "integer",
    stored: str | np.dtype = "float32",
    damp: float = DAMP,
    lazy: int = LAZY,
    dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of w [N, K] with the second moments `hessian` [K, K] of its input, onto
    MatMulNBits' blocks of `block` along K. Returns what quantize_blocks returns:
    (q uint8 [N, blocks, block], scale float32 [N, blocks], zero_point [N, blocks]),
    w ~ (q - zero_point) * scale. `dtype` is the arithmetic's (float64 in the reference tests)."""
    import numpy as np

    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian is {hessian.shape}, the weight has {k} input columns")
    nb = -(-k // block)
    kp = nb * block
    w = np.asarray(w, dtype=dtype)
    h = np.asarray(hessian, dtype=dtype)
    if kp != k:  # padded columns: zero weights, no input (dead), exact whatever the grid
        w = np.pad(w, ((0, 0), (0, kp - k)))
        h = np.pad(h, ((0, kp - k), (0, kp - k)))
    importance = np.maximum(np.einsum("ii->i", h), 0.0).astype(np.float32)
    u = inverse_cholesky(h, damp)
    maxq = float(2**bits - 1)
    float_zp = zero_points == "float"
    q_out = np.empty((n, nb, block), dtype=np.uint8)
    s_out = np.empty((n, nb), dtype=np.float32)
    z_out = np.empty((n, nb), dtype=np.float32 if float_zp else np.uint8)
    w = np.array(w, copy=True)
    lazy = max(block, lazy - lazy % block)  # whole blocks per lazy batch
    for c0 in range(0, kp, lazy):
        c1 = min(c0 + lazy, kp)
        w1 = w[:, c0:c1]  # a view: the corrections land in w
        err = np.zeros((n, c1 - c0), dtype=w.dtype)
        u1 = u[c0:c1, c0:c1]
        scale = zp = None
        for i in range(c1 - c0):
            col = c0 + i
            g, j = divmod(col, block)
            if j == 0:  # a new block: its grid from its weights as the corrections left them
                _, s, z = quantize_blocks(
                    w1[:, i : i + block], bits, block, importance[col : col + block], zero_points, stored
                )
                s_out[:, g], z_out[:, g] = s[:, 0], z[:, 0]
                scale, zp = s[:, 0].astype(w.dtype), z[:, 0].astype(w.dtype)
            x = w1[:, i]
            lv = np.clip(np.rint(x / scale + zp), 0.0, maxq)
            q_out[:, g, j] = lv
            e = (x - (lv - zp) * scale) / u1[i, i]
            w1[:, i + 1 :] -= np.outer(e, u1[i, i + 1 :])
            err[:, i] = e
        w[:, c1:] -= err @ u[c0:c1, c1:]
    return q_out, s_out, z_out
