"""Pure-numpy MatMulNBits arithmetic: blockwise quantization, packing, and the split plan.

No onnx or torch here: the functions take and return numpy arrays, so they are unit-tested
without exporting a model (tests/test_requant.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Per-layer MatMul node names of the builder and of optimum graphs: (layer index, projection).
LAYER_MATMUL = re.compile(r"^/model/layers\.(\d+)/(?:self_attn|attn|mlp)/(\w+)/MatMul$")


def quantize_blocks(
    w: np.ndarray, bits: int, block: int, importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric blockwise quantization of w [N, K] along K, as MatMulNBits stores it.

    Returns (q uint8 [N, blocks, block], scale float32 [N, blocks], zero_point uint8 [N, blocks])
    with w ~ (q - zero_point) * scale. Each block keeps the candidate with the least weighted
    squared error measured after the zero point is rounded to an integer; weights are
    importance[k] * sqrt(mean(x^2) + x^2) with an imatrix, sqrt(mean(x^2)) + |x| without.
    """
    import numpy as np

    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    nb = -(-k // block)
    pad = nb * block - k
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    imp = None
    if importance is not None:
        imp = np.pad(np.asarray(importance, dtype=np.float32), (0, pad)).reshape(nb, block)
        imp = np.maximum(imp, 1e-12 * max(float(imp.max()), 1e-30))  # no column may weigh exactly 0
    x_all = w.reshape(n * nb, block)
    maxq = float(2**bits - 1)
    q_out = np.empty((n * nb, block), dtype=np.uint8)
    s_out = np.empty(n * nb, dtype=np.float32)
    z_out = np.empty(n * nb, dtype=np.uint8)
    rows_per_chunk = max(1, 65536 // nb) * nb  # whole rows, so importance tiles line up
    factors = [None] + [maxq - 1 + 0.1 * i for i in range(21)]
    for start in range(0, n * nb, rows_per_chunk):
        x = x_all[start : start + rows_per_chunk].astype(np.float64)
        sigma2 = (x * x).mean(1, keepdims=True)
        if imp is not None:
            wts = np.tile(imp, (len(x) // nb, 1)) * np.sqrt(sigma2 + x * x)
        else:
            wts = np.sqrt(sigma2) + np.abs(x)
        rmin, rmax = x.min(1, keepdims=True), x.max(1, keepdims=True)
        rng = np.where(rmax > rmin, rmax - rmin, 1.0)
        sw, sx = wts.sum(1, keepdims=True), (wts * x).sum(1, keepdims=True)
        best_err = np.full((len(x), 1), np.inf)
        best_s = np.ones((len(x), 1))
        best_z = np.zeros((len(x), 1))

        def consider(scale, mn, x=x, wts=wts):  # bound per chunk: the loop rebinds x and wts
            nonlocal best_err, best_s, best_z
            zp = np.clip(np.round(-mn / scale), 0, maxq)
            lq = np.clip(np.round(x / scale + zp), 0, maxq)
            err = (wts * ((lq - zp) * scale - x) ** 2).sum(1, keepdims=True)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, scale, best_s)
            best_z = np.where(better, zp, best_z)

        for factor in factors:
            iscale = (maxq if factor is None else factor) / rng
            if factor is None:  # plain min-max
                consider(1 / iscale, rmin)
                continue
            lv = np.clip(np.round(iscale * (x - rmin)), 0, maxq)
            wl = wts * lv
            sl, sl2, sxl = wl.sum(1, keepdims=True), (wl * lv).sum(1, keepdims=True), (wl * x).sum(1, keepdims=True)
            d = sw * sl2 - sl * sl
            ok = d > 0
            safe_d = np.where(ok, d, 1.0)
            scale = (sw * sxl - sx * sl) / safe_d
            mn = (sl2 * sx - sl * sxl) / safe_d
            ok &= scale > 0
            consider(np.where(ok, scale, 1 / iscale), np.where(ok, mn, rmin))
        # refit the scale with the chosen levels and zero point fixed
        lq = np.clip(np.round(x / best_s + best_z), 0, maxq) - best_z
        num, den = (wts * x * lq).sum(1, keepdims=True), (wts * lq * lq).sum(1, keepdims=True)
        refit = np.where((den > 0) & (num > 0), num / np.where(den > 0, den, 1.0), best_s)
        consider(refit, -best_z * refit)
        # constant blocks are exact: c = (maxq - 0) * c/maxq, or (0 - maxq) * (-c/maxq)
        flat = (rmax <= rmin)[:, 0]
        if flat.any():
            c = rmin[flat]
            best_s[flat] = np.where(c != 0, np.abs(c) / maxq, 1.0)
            best_z[flat] = np.where(c < 0, maxq, 0.0)
        scale32 = best_s.astype(np.float32)
        lq = np.clip(np.round(x / scale32 + best_z), 0, maxq)
        sl = slice(start, start + len(x))
        q_out[sl], s_out[sl], z_out[sl] = lq.astype(np.uint8), scale32[:, 0], best_z[:, 0].astype(np.uint8)
    return q_out.reshape(n, nb, block), s_out.reshape(n, nb), z_out.reshape(n, nb)


def pack_matmulnbits(
    q: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [N, blocks, block], scale [N, blocks], zp [N, blocks]) -> the B, scales and
    zero_points arrays of MatMulNBits: 4-bit pairs low nibble first, zero points per row."""
    import numpy as np

    n, nb, block = q.shape
    if bits == 4:
        b = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
        zpp = np.zeros((n, (nb + 1) // 2), dtype=np.uint8)
        zpp[:, : (nb + 1) // 2] |= zp[:, 0::2]
        zpp[:, : nb // 2] |= zp[:, 1::2] << 4
    else:
        b, zpp = q.astype(np.uint8), zp.astype(np.uint8)
    return b, scale, zpp


def dequantize_matmulnbits(
    b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, block: int, n: int, k: int
) -> np.ndarray:
    """MatMulNBits initializers -> float weight [N, K] (the inverse of pack_matmulnbits)."""
    import numpy as np

    nb = -(-k // block)
    b = np.asarray(b).reshape(n, nb, block * bits // 8)
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, nb, -1) if bits == 4 else b
    scales = np.asarray(scales, dtype=np.float32).reshape(n, nb)
    if zp is None:
        z = np.full((n, nb), 2 ** (bits - 1), dtype=np.float32)
    elif bits == 4:
        zpp = np.asarray(zp).reshape(n, -1)
        z = np.stack([zpp & 0x0F, zpp >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float32)
    else:
        z = np.asarray(zp).reshape(n, nb).astype(np.float32)
    w = (q.astype(np.float32) - z[..., None]) * scales[..., None]
    return w.reshape(n, -1)[:, :k]


def plan(
    base: str, n: int, bits: int, int8: Sequence[str], qkv_sizes: Sequence[int] | None
) -> list[tuple[str, int, int, int]]:
    """Runs (label, first row, end row, bits) the node becomes; one run keeps it whole."""
    m = LAYER_MATMUL.match(base)
    proj = m.group(2) if m else None
    if proj == "qkv_proj" and qkv_sizes and sum(qkv_sizes) == n and "qkv_proj" not in int8:
        widths = [8 if f"{p}_proj" in int8 else bits for p in "qkv"]
        runs: list[list] = []
        start = 0
        for p, size, w in zip("qkv", qkv_sizes, widths):
            if runs and runs[-1][3] == w:
                runs[-1][0] += p
                runs[-1][2] += size
            else:
                runs.append([p, start, start + size, w])
            start += size
        if len(runs) > 1:
            return [tuple(r) for r in runs]
        return [("", 0, n, runs[0][3])]
    if proj is not None and proj in int8:
        return [("", 0, n, 8)]
    return [("", 0, n, bits)]
