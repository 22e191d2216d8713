"""Unit tests of onnx-int4's pure-numpy re-quantization (edgekit.formats.onnx_int4.requant).

No model is exported: the functions take numpy arrays. The kernel's own reading of the packed
arrays is pinned through onnxruntime in tests/test_recipes.py (integer zero points) and here
(float zero points), on one-node graphs.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgekit.formats.onnx_int4.requant import dequantize_matmulnbits, pack_matmulnbits, quantize_blocks

# (N, K, block): K a multiple of the block, K padded (not a multiple), an odd block count
# (the 4-bit zero points of a row then end in half a byte).
SHAPES = [(8, 64, 32), (6, 100, 16), (5, 96, 32), (3, 576, 64)]


def _weights(seed: int, n: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # rows of different scales, and heavy tails every other seed: outliers are what a search is for
    rows = rng.uniform(0.05, 3.0, (n, 1))
    base = rng.standard_t(3, (n, k)) if seed % 2 else rng.standard_normal((n, k))
    return (base * rows).astype(np.float32)


def _dequantized(q, scale, zp) -> np.ndarray:
    return (q.astype(np.float64) - zp[..., None]) * scale.astype(np.float64)[..., None]


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    n, k = w.shape
    nb = -(-k // block)
    return np.pad(w.astype(np.float64), ((0, 0), (0, nb * block - k))).reshape(n, nb, block)


@pytest.mark.parametrize("n, k, block", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_then_dequantize_is_exact(n, k, block, bits):
    """Any codes, scales and zero points survive packing: dequantize(pack(q, s, z)) is
    exactly (q - z) * s, trimmed to K."""
    rng = np.random.default_rng(n * k + bits)
    nb = -(-k // block)
    maxq = 2**bits - 1
    q = rng.integers(0, maxq + 1, (n, nb, block), dtype=np.uint8)
    zp = rng.integers(0, maxq + 1, (n, nb), dtype=np.uint8)
    scale = rng.uniform(1e-3, 2.0, (n, nb)).astype(np.float32)
    b, s, z = pack_matmulnbits(q, scale, zp, bits)
    assert b.dtype == np.uint8 and b.shape == (n, nb, block * bits // 8)
    if bits == 4:
        assert z.shape == (n, (nb + 1) // 2)  # two zero points a byte, low nibble first
    got = dequantize_matmulnbits(b, s, z, bits, block, n, k)
    expected = ((q.astype(np.float32) - zp[..., None].astype(np.float32)) * scale[..., None]).reshape(n, -1)[:, :k]
    np.testing.assert_array_equal(got, expected)


def test_dequantize_without_zero_points_uses_the_kernel_default():
    """MatMulNBits without a zero_points input centres the codes at 2^(bits-1)."""
    q = np.arange(32, dtype=np.uint8).reshape(1, 1, 32) % 16
    scale = np.full((1, 1), 0.5, dtype=np.float32)
    b, s, _ = pack_matmulnbits(q, scale, np.zeros((1, 1), dtype=np.uint8), 4)
    got = dequantize_matmulnbits(b, s, None, 4, 32, 1, 32)
    np.testing.assert_array_equal(got, (q.reshape(1, 32).astype(np.float32) - 8) * 0.5)


@pytest.mark.parametrize("n, k, block", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_codes_fit_the_width_and_the_error_is_bounded(n, k, block, bits):
    """Codes and zero points are within [0, 2^bits - 1], and per block the weighted RMS error
    is at most one step of the block's min-max grid ((max - min) / (2^bits - 1)): the
    search always considers min-max with a rounded zero point, whose every element is
    within one step, and keeps a candidate only when its weighted error is smaller."""
    w = _weights(n + k + bits, n, k)
    q, scale, zp = quantize_blocks(w, bits, block)
    maxq = 2**bits - 1
    assert q.max() <= maxq and zp.max() <= maxq and (scale > 0).all()
    x = _blocks(w, block)
    err = _dequantized(q, scale, zp) - x
    wts = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)  # the search's weights without an imatrix
    weighted_rms = np.sqrt((wts * err**2).sum(-1) / wts.sum(-1))
    step = (x.max(-1) - x.min(-1)) / maxq
    assert (weighted_rms <= step * (1 + 1e-4) + 1e-12).all()


def test_constant_blocks_are_exact():
    const = np.full((3, 64), -0.37, dtype=np.float32)
    const[1] = 0.0
    const[2] = 1.25
    for bits in (4, 8):
        q, scale, zp = quantize_blocks(const, bits, 32)
        np.testing.assert_allclose(_dequantized(q, scale, zp), const.reshape(3, 2, 32), atol=1e-7)


def test_the_search_beats_plain_min_max():
    """The point of the search: less error than min-max rounding with the same widths."""
    w = _weights(3, 64, 256)
    x = _blocks(w, 32)
    q, scale, zp = quantize_blocks(w, 4, 32)
    searched = float(np.mean((_dequantized(q, scale, zp) - x) ** 2))
    rmin, rmax = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    s = (rmax - rmin) / 15
    z = np.clip(np.round(-rmin / s), 0, 15)
    minmax = float(np.mean(((np.clip(np.round(x / s + z), 0, 15) - z) * s - x) ** 2))
    assert searched < 0.95 * minmax


@pytest.mark.parametrize("seed", range(8))
def test_importance_weighted_search_is_never_worse_on_the_weighted_error(seed):
    """With an importance vector (an imatrix: mean squared input per column), the matrix's
    importance-weighted squared error is no larger than the plain search's. (Per block it
    can be, rarely: the two searches try different refitted candidates.)"""
    rng = np.random.default_rng(100 + seed)
    n, k = 48, 128
    w = _weights(seed, n, k)
    importance = (rng.uniform(0.01, 1.0, k) ** 3).astype(np.float32)  # a few columns dominate
    x = _blocks(w, 32).reshape(n, -1)[:, :k]

    def weighted_error(imp):
        q, scale, zp = quantize_blocks(w, 4, 32, imp)
        err = _dequantized(q, scale, zp).reshape(n, -1)[:, :k] - x
        return float((importance * err**2).sum())

    assert weighted_error(importance) <= weighted_error(None)


def test_importance_moves_error_off_important_columns():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    importance = np.ones(64, dtype=np.float32)
    importance[::8] = 100.0
    err = {}
    for name, imp in (("plain", None), ("weighted", importance)):
        q, scale, zp = quantize_blocks(w, 4, 32, imp)
        err[name] = float(np.mean((_dequantized(q, scale, zp).reshape(w.shape) - w)[:, ::8] ** 2))
    assert err["weighted"] < 0.7 * err["plain"]


@pytest.mark.parametrize("n, k, block", SHAPES)
def test_int8_is_more_accurate_than_int4(n, k, block):
    """Sixteen times as many levels: the RMS error drops by more than an order of magnitude."""
    w = _weights(7 + k, n, k)
    x = _blocks(w, block)
    rms = {}
    for bits in (4, 8):
        q, scale, zp = quantize_blocks(w, bits, block)
        rms[bits] = float(np.sqrt(np.mean((_dequantized(q, scale, zp) - x) ** 2)))
    assert 0 < rms[8] < rms[4] / 10


# --- float zero points (zero_points = "float": a float minimum per block) --------------------


def _stored(q, scale, zp) -> np.ndarray:
    """What MatMulNBits computes from float zero points: q * scale - scale * zero_point."""
    s = scale.astype(np.float64)[..., None]
    return q.astype(np.float64) * s - s * zp.astype(np.float64)[..., None]


@pytest.mark.parametrize("n, k, block", SHAPES)
def test_float_minimums_stay_within_half_a_step(n, k, block):
    """Min-max with a float minimum puts every weight within half a step of the grid, and the
    search keeps a candidate only when its weighted error is smaller: half the integer bound."""
    w = _weights(n + k, n, k)
    q, scale, zp = quantize_blocks(w, 4, block, zero_points="float")
    assert zp.dtype == np.float32 and zp.shape == scale.shape and q.max() <= 15 and (scale > 0).all()
    x = _blocks(w, block)
    err = _stored(q, scale, zp) - x
    wts = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)
    weighted_rms = np.sqrt((wts * err**2).sum(-1) / wts.sum(-1))
    half_step = (x.max(-1) - x.min(-1)) / 15 / 2
    assert (weighted_rms <= half_step * (1 + 1e-4) + 1e-7).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("weighted", [False, True])
def test_float_minimums_are_never_worse_than_integer_zero_points(seed, weighted):
    """Heavy-tailed rows with outliers, with and without an imatrix: the matrix's weighted
    squared error with float minimums is at most the integer zero points' (and in practice
    well below: the minimum is no longer rounded to a multiple of the scale)."""
    rng = np.random.default_rng(200 + seed)
    n, k = 64, 192
    w = _weights(2 * seed + 1, n, k)
    w[rng.integers(0, n, 12), rng.integers(0, k, 12)] *= 8  # a few outliers
    importance = (rng.uniform(0.01, 1.0, k) ** 3).astype(np.float32) if weighted else None
    x = _blocks(w, 32)
    col = np.ones(k) if importance is None else importance.astype(np.float64)

    def error(**kw):
        q, scale, zp = quantize_blocks(w, 4, 32, importance, **kw)
        got = _stored(q, scale, zp) if zp.dtype.kind == "f" else _dequantized(q, scale, zp)
        return float((col * (got - x).reshape(n, -1)[:, :k] ** 2).sum())

    assert error(zero_points="float") <= error(zero_points="integer")


def test_float_minimums_are_rounded_to_the_stored_dtype():
    """With fp16 scales (a float16 graph) scale and minimum are fp16 values, and the error is
    still bounded by the min-max grid."""
    w = _weights(5, 16, 128)
    q, scale, zp = quantize_blocks(w, 4, 32, zero_points="float", stored="float16")
    for a in (scale, zp):
        np.testing.assert_array_equal(a.astype(np.float16).astype(np.float32), a)
    x = _blocks(w, 32)
    step = (x.max(-1) - x.min(-1)) / 15
    assert (np.sqrt(np.mean((_stored(q, scale, zp) - x) ** 2, -1)) <= step).all()


def test_float_minimums_keep_constant_blocks_exact():
    const = np.full((3, 64), -0.37, dtype=np.float32)
    const[1] = 0.0
    const[2] = 1.25
    q, scale, zp = quantize_blocks(const, 4, 32, zero_points="float")
    np.testing.assert_allclose(_stored(q, scale, zp), const.reshape(3, 2, 32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n, k, block", SHAPES)
def test_float_zero_points_pack_unpacked_and_round_trip(n, k, block):
    """Float zero points are one per block, the scales' shape (not two a byte), and
    dequantize(pack(...)) is exactly the kernel's q * s + (-s * z) in float32."""
    rng = np.random.default_rng(k)
    nb = -(-k // block)
    q = rng.integers(0, 16, (n, nb, block), dtype=np.uint8)
    scale = rng.uniform(1e-3, 2.0, (n, nb)).astype(np.float32)
    zp = rng.uniform(-2.0, 17.0, (n, nb)).astype(np.float32)
    b, s, z = pack_matmulnbits(q, scale, zp, 4)
    assert z.dtype == np.float32 and z.shape == (n, nb)
    got = dequantize_matmulnbits(b, s, z, 4, block, n, k)
    expected = (q.astype(np.float32) * scale[..., None] + (-(scale * zp))[..., None]).reshape(n, -1)[:, :k]
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="4-bit"):
        pack_matmulnbits(q, scale, zp, 8)


@pytest.mark.parametrize("n, k, block", [(24, 128, 32), (16, 96, 32), (8, 576, 64), (6, 100, 16)])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_onnxruntime_float_zero_points_match_numpy(n, k, block, accuracy_level):
    """A one-node MatMulNBits graph with float zero points computes A @ W.T for the W numpy
    dequantizes (odd block counts and a padded K included)."""
    from ortnode import matmulnbits_session

    w = _weights(n * k, n, k)
    b, s, z = pack_matmulnbits(*quantize_blocks(w, 4, block, zero_points="float"), 4)
    sess = matmulnbits_session(b, s, z, k, n, 4, block, accuracy_level)
    a = np.random.default_rng(k).standard_normal((5, k)).astype(np.float32)
    expected = a.astype(np.float64) @ dequantize_matmulnbits(b, s, z, 4, block, n, k).astype(np.float64).T
    got = sess.run(None, {"A": a})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_the_module_imports_no_onnx_or_torch():
    code = (
        "import sys, edgekit.formats.onnx_int4.requant; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the search against a plain reference, and its independence of chunking and threads -----


def _reference_block(x, wts, maxq, zero_points):
    """One block's search written plainly in float64: the same candidates (min-max, 21
    refitted grids, one refit of the best), each kept on strictly less weighted squared error
    of its stored form. Returns the best candidate's weighted error."""

    def stored(scale, mn):
        s = float(np.float32(max(scale, float(np.finfo(np.float32).tiny))))
        if zero_points == "float":
            return s, float(np.float32(-mn / s))
        return s, min(max(round(-mn / s), 0), maxq)

    def error(s, z):
        lq = np.clip(np.round(x / s + z), 0, maxq)
        return float((wts * ((lq - z) * s - x) ** 2).sum()), lq

    def fit(lv):
        sw, sx, sl = wts.sum(), (wts * x).sum(), (wts * lv).sum()
        sl2, sxl = (wts * lv * lv).sum(), (wts * lv * x).sum()
        d = sw * sl2 - sl * sl
        if d <= 0:
            return None
        scale = (sw * sxl - sx * sl) / d
        return (scale, (sl2 * sx - sl * sxl) / d) if scale > 0 else None

    rmin, rmax = x.min(), x.max()
    if rmax <= rmin:  # constant: the stored form is exact, to float32 rounding
        return 0.0
    rng = rmax - rmin
    candidates = [(rng / maxq, rmin)]
    for factor in [maxq - 1 + 0.1 * i for i in range(21)]:
        lv = np.clip(np.round(factor / rng * (x - rmin)), 0, maxq)
        candidates.append(fit(lv) or (rng / factor, rmin))
    best, best_sz = np.inf, None
    for c in candidates:
        sz = stored(*c)
        e = error(*sz)[0]
        if e < best:
            best, best_sz = e, sz
    s, z = best_sz
    lq = error(s, z)[1]
    if zero_points == "float":
        refit = fit(lq) or (s, -z * s)
    else:
        lz = lq - z
        num, den = (wts * x * lz).sum(), (wts * lz * lz).sum()
        r_s = num / den if den > 0 and num > 0 else s
        refit = (r_s, -z * r_s)
    return min(best, error(*stored(*refit))[0])


def _reference_search(w, bits, block, importance, zero_points):
    """_reference_block over every block: the per-block weighted error [N, blocks]."""
    n, k = w.shape
    x_all = _blocks(w, block)
    nb = x_all.shape[1]
    imp = None
    if importance is not None:
        imp = np.pad(importance.astype(np.float32), (0, nb * block - k)).reshape(nb, block)
        imp = np.maximum(imp, 1e-12 * max(float(imp.max()), 1e-30)).astype(np.float64)
    out = np.empty((n, nb))
    for r in range(n):
        for b in range(nb):
            x = x_all[r, b]
            sigma2 = np.mean(x * x)
            wts = imp[b] * np.sqrt(sigma2 + x * x) if imp is not None else np.sqrt(sigma2) + np.abs(x)
            out[r, b] = _reference_block(x, wts, 2**bits - 1, zero_points)
    return out


def _search_error(w, block, importance, q, scale, zp):
    x = _blocks(w, block)
    nb = x.shape[1]
    if importance is not None:
        imp = np.pad(importance.astype(np.float32), (0, nb * block - w.shape[1])).reshape(nb, block)
        imp = np.maximum(imp, 1e-12 * max(float(imp.max()), 1e-30)).astype(np.float64)
        wts = imp * np.sqrt((x * x).mean(-1, keepdims=True) + x * x)
    else:
        wts = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)
    return (wts * (_dequantized(q, scale, zp) - x) ** 2).sum(-1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits, zero_points", [(4, "float"), (4, "integer"), (8, "integer")])
def test_search_is_never_worse_than_the_plain_reference(seed, bits, zero_points):
    """Per block, the vectorised, chunked search finds a weighted error no larger than the
    plain one-block-at-a-time search over the same candidates (up to float64 rounding)."""
    rng = np.random.default_rng(300 + seed)
    n, k = 12, 100 if seed % 2 else 96  # a padded K every other seed
    w = _weights(seed, n, k)
    w[rng.integers(0, n, 4), rng.integers(0, k, 4)] *= 6  # a few outliers
    w[0, :32] = 0.25  # a constant block
    importance = (rng.uniform(0.01, 1.0, k) ** 3).astype(np.float32) if seed < 2 else None
    q, scale, zp = quantize_blocks(w, bits, 32, importance, zero_points, chunk_blocks=5)
    got = _search_error(w, 32, importance, q, scale, zp)
    ref = _reference_search(w, bits, 32, importance, zero_points)
    x = _blocks(w, 32)
    tol = 1e-12 * (x * x).sum(-1)  # constant blocks: exact but for float32 rounding
    assert (got <= ref * (1 + 1e-6) + tol).all(), np.max(got / np.maximum(ref, 1e-300))


@pytest.mark.parametrize(
    "bits, zero_points, stored", [(4, "float", "float32"), (4, "float", "float16"), (8, "integer", "float32")]
)
def test_search_output_does_not_depend_on_chunks_or_threads(bits, zero_points, stored):
    """Byte-identical results whatever the chunk size and thread count (exports are
    byte-reproducible on any machine)."""
    rng = np.random.default_rng(7)
    w = _weights(11, 37, 200)  # 7 blocks a row, the last one padded
    importance = rng.uniform(0.01, 1.0, 200).astype(np.float32) if zero_points == "float" else None
    ref = quantize_blocks(w, bits, 32, importance, zero_points, stored)
    for chunk_blocks, workers in [(1, 1), (7, 3), (50, 2), (64, 1), (10**6, 2)]:
        got = quantize_blocks(w, bits, 32, importance, zero_points, stored, workers=workers, chunk_blocks=chunk_blocks)
        for a, b in zip(ref, got):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
