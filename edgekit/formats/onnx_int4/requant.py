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


# What quantize_blocks fits per block: "integer" zero points (uint8, 4-bit packed two a byte)
# or "float" ones (any real offset: Q4_1 / Q4_K's float minimum). The recipe's "float_matmul"
# searches "float" and stores it with block_minimums().
ZERO_POINTS = ("integer", "float")


# Blocks per work chunk of quantize_blocks. A chunk's float64 working set (eight [block, 2048]
# arrays, 512 KiB each at block 32) stays in the CPU caches through the search's ~300 passes;
# 65536-block chunks (16 MiB arrays) went to memory on every pass. 1024 to 8192 time the same
# within noise on a 2-core EPYC; smaller chunks pay numpy's per-call overhead (benchmarks/requant_speed.py).
CHUNK_BLOCKS = 2048


def quantize_blocks(
    w: np.ndarray,
    bits: int,
    block: int,
    importance: np.ndarray | None = None,
    zero_points: str = "integer",
    stored: str | np.dtype = "float32",
    workers: int = 1,
    chunk_blocks: int = CHUNK_BLOCKS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric blockwise quantization of w [N, K] along K, as MatMulNBits stores it.

    Returns (q uint8 [N, blocks, block], scale float32 [N, blocks], zero_point [N, blocks]) with
    w ~ (q - zero_point) * scale. zero_points "integer": uint8 zero points; "float": float32 ones
    (any real offset, so w ~ q * scale + min with min = -zero_point * scale). Each block keeps the
    candidate with the least weighted squared error of the form stored: scale and a float zero
    point rounded to `stored` (the scales' dtype in the graph), an integer one rounded to an
    integer. Weights are importance[k] * sqrt(mean(x^2) + x^2) with an imatrix, sqrt(mean(x^2)) + |x|
    without.

    Blocks are searched independently, chunk_blocks (whole rows) at a time, on `workers`
    threads (numpy releases the GIL in the array passes); the result does not depend on either,
    byte for byte. An export already runs two nodes at once (nodequant.ordered_map), hence 1.
    """
    import numpy as np

    if zero_points not in ZERO_POINTS:
        raise ValueError(f"zero_points must be one of {ZERO_POINTS}, not {zero_points!r}")
    float_zp = zero_points == "float"
    sdt = np.dtype(stored)
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    nb = -(-k // block)
    pad = nb * block - k
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    rows = max(1, chunk_blocks // nb)  # whole rows, so one importance tile fits every chunk
    imp_t = None
    if importance is not None:
        imp = np.pad(np.asarray(importance, dtype=np.float32), (0, pad)).reshape(nb, block)
        imp = np.maximum(imp, 1e-12 * max(float(imp.max()), 1e-30))  # no column may weigh exactly 0
        imp_t = np.tile(imp.T.astype(np.float64), (1, min(rows, n)))  # [block, rows * nb]: a chunk's layout
    x_all = w.reshape(n * nb, block)
    maxq = float(2**bits - 1)
    tiny = float(np.finfo(sdt).tiny)
    q_out = np.empty((n * nb, block), dtype=np.uint8)
    s_out = np.empty(n * nb, dtype=np.float32)
    z_out = np.empty(n * nb, dtype=np.float32 if float_zp else np.uint8)
    factors = [maxq - 1 + 0.1 * i for i in range(21)]

    def stored_form(scale, mn):
        """(scale, zero point) as the initializers hold them, back in float64."""
        s = np.maximum(scale, tiny).astype(sdt).astype(np.float64)
        if float_zp:
            return s, (-mn / s).astype(sdt).astype(np.float64)
        return s, np.clip(np.round(-mn / s), 0, maxq)

    def search(start: int) -> None:
        """The search over blocks start .. start + rows * nb, transposed to [block, m] so each
        block is a column: per-block sums run down the columns, contiguous and in cache."""
        stop = min(start + rows * nb, n * nb)
        m = stop - start
        x = x_all[start:stop].T.astype(np.float64)  # a C-contiguous copy
        t1, t2, lv = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        np.multiply(x, x, out=t1)
        sigma2 = t1.mean(0)
        if imp_t is not None:
            np.add(t1, sigma2, out=t1)
            wts = np.sqrt(t1)
            np.multiply(wts, imp_t[:, :m], out=wts)
        else:
            wts = np.abs(x)
            np.add(wts, np.sqrt(sigma2), out=wts)
        wx = wts * x
        sw, sx = wts.sum(0), wx.sum(0)
        rmin, rmax = x.min(0), x.max(0)
        flat = rmax <= rmin
        rng = np.where(flat, 1.0, rmax - rmin)
        xm = x - rmin
        best = [np.full(m, np.inf), np.ones(m), np.zeros(m)]  # error, scale, zero point

        def levels(s, zp):
            """lv = clip(round(x / s + zp), 0, maxq); t2 = x / s + zp. x / s + zp is monotonic in
            x, so a block's extremes, computed the same way, tell whether a clip can bind."""
            inv = 1.0 / s
            np.multiply(x, inv, out=t2)
            np.add(t2, zp, out=t2)
            np.rint(t2, out=lv)
            if np.rint(rmin * inv + zp).min() < 0:
                np.maximum(lv, 0.0, out=lv)
            if np.rint(rmax * inv + zp).max() > maxq:
                np.minimum(lv, maxq, out=lv)

        def consider(scale, mn):
            s, zp = stored_form(scale, mn)
            levels(s, zp)
            # (lv - zp) * s - x = s * (lv - (x / s + zp))
            np.subtract(lv, t2, out=t2)
            np.multiply(t2, wts, out=t1)
            err = np.einsum("ij,ij->j", t1, t2) * (s * s)
            better = err < best[0]
            for i, v in enumerate((err, s, zp)):
                best[i] = np.where(better, v, best[i])

        def fit(lv):
            """Weighted least squares x ~ scale * lv + mn per block: (scale, mn, ok)."""
            np.multiply(wts, lv, out=t1)
            sl, sl2, sxl = t1.sum(0), np.einsum("ij,ij->j", t1, lv), np.einsum("ij,ij->j", wx, lv)
            d = sw * sl2 - sl * sl
            ok = d > 0
            safe_d = np.where(ok, d, 1.0)
            scale = (sw * sxl - sx * sl) / safe_d
            mn = (sl2 * sx - sl * sxl) / safe_d
            return scale, mn, ok & (scale > 0)

        consider(rng / maxq, rmin)  # plain min-max
        for factor in factors:
            iscale = factor / rng
            np.multiply(xm, iscale, out=lv)  # >= 0
            np.rint(lv, out=lv)
            if np.rint(rng * iscale).max() > maxq:
                np.minimum(lv, maxq, out=lv)
            scale, mn, ok = fit(lv)
            consider(np.where(ok, scale, 1 / iscale), np.where(ok, mn, rmin))
        _, best_s, best_z = best
        levels(best_s, best_z)
        if float_zp:  # refit scale and minimum with the chosen levels fixed
            scale, mn, ok = fit(lv)
            consider(np.where(ok, scale, best_s), np.where(ok, mn, -best_z * best_s))
        else:  # refit the scale with the chosen levels and zero point fixed
            np.subtract(lv, best_z, out=lv)
            num, den = np.einsum("ij,ij->j", wx, lv), np.einsum("ij,ij,ij->j", wts, lv, lv)
            refit = np.where((den > 0) & (num > 0), num / np.where(den > 0, den, 1.0), best_s)
            consider(refit, -best_z * refit)
        _, best_s, best_z = best
        # constant blocks are exact: c = (maxq - 0) * c/maxq, or (0 - maxq) * (-c/maxq); with a
        # float zero point, c = (0 - (-c/s)) * s
        if flat.any():
            c = rmin[flat]
            best_s[flat], best_z[flat] = stored_form(
                np.where(c != 0, np.abs(c) / maxq, 1.0), np.where(c < 0, c, 0.0) if not float_zp else c
            )
        levels(best_s, best_z)
        q_out[start:stop], s_out[start:stop], z_out[start:stop] = lv.T, best_s, best_z

    starts = range(0, n * nb, rows * nb)
    if workers > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(starts))) as pool:
            for _ in pool.map(search, starts):  # re-raises a chunk's exception
                pass
    else:
        for start in starts:
            search(start)
    return q_out.reshape(n, nb, block), s_out.reshape(n, nb), z_out.reshape(n, nb)


def pack_matmulnbits(
    q: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [N, blocks, block], scale [N, blocks], zp [N, blocks]) -> the B, scales and
    zero_points arrays of MatMulNBits: 4-bit pairs low nibble first, integer zero points packed
    per row the same way; float zero points stay one per block, as they are."""
    import numpy as np

    n, nb, block = q.shape
    if zp.dtype.kind == "f" and bits != 4:
        # onnxruntime 1.32's CPU kernel dequantizes float zero points for 4 bits only
        raise ValueError(f"float zero points need 4-bit codes, not {bits}")
    if bits == 4:
        b = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
        if zp.dtype.kind == "f":
            return b, scale, zp
        zpp = np.zeros((n, (nb + 1) // 2), dtype=np.uint8)
        zpp[:, : (nb + 1) // 2] |= zp[:, 0::2]
        zpp[:, : nb // 2] |= zp[:, 1::2] << 4
    else:
        b, zpp = q.astype(np.uint8), zp.astype(np.uint8)
    return b, scale, zpp


def block_minimums(scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Float zero points [N, blocks] -> the per-block addend [blocks, N] of a symmetric
    MatMulNBits (no zero_points input: the kernel subtracts 2^(bits-1)):
    (q - z) * s = (q - 2^(bits-1)) * s + (2^(bits-1) - z) * s. Transposed, as a MatMul's B."""
    import numpy as np

    mid = float(2 ** (bits - 1))
    return ((mid - zp.astype(np.float64)) * scale.astype(np.float64)).T.astype(np.float32)


def dequantize_matmulnbits(
    b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, block: int, n: int, k: int
) -> np.ndarray:
    """MatMulNBits initializers -> float weight [N, K] (the inverse of pack_matmulnbits)."""
    import numpy as np

    nb = -(-k // block)
    b = np.asarray(b).reshape(n, nb, block * bits // 8)
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, nb, -1) if bits == 4 else b
    scales = np.asarray(scales, dtype=np.float32).reshape(n, nb)
    if zp is not None and np.asarray(zp).dtype.kind == "f":
        # the kernel's own order: q * scale + (-scale * zero_point), in float32
        z = np.asarray(zp, dtype=np.float32).reshape(n, nb)
        w = q.astype(np.float32) * scales[..., None] + (-(scales * z))[..., None]
        return w.reshape(n, -1)[:, :k]
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
