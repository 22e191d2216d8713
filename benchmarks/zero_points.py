"""MatMulNBits with float zero points: what onnxruntime computes, and how fast.

recipe key zero_points = "float" (edgekit/formats/onnx_int4/requant.py) stores each int4 block's
offset as a float of the scales' type instead of a uint8 zero point. This script pins, on the
installed onnxruntime:

1. the arithmetic: a one-node MatMulNBits model (A = identity, so the output is the dequantized
   weight) against numpy's q * scale - scale * zero_point and (q - zero_point) * scale, for
   accuracy_level 0 and 4, and whether 8-bit codes accept float zero points;
2. the speed of one K x N = 3072 x 8192 MatMul (Phi-3-mini's up projection) with uint8 zero
   points, float zero points, and the float_matmul form (symmetric codes + block sums of the
   input times a float [K/block, N] matrix, as edgekit writes it), accuracy_level 4, for one row
   (decode) and 128 rows (prefill): median of --reps runs after a warm-up, 2 intra-op threads.

Writes benchmarks/results/zero_points.{json,md} and the docs section between
<!-- zero-points:start --> and <!-- zero-points:end -->.

Usage:
    .venv/bin/python benchmarks/zero_points.py            # ~1 min on 2 cores
    .venv/bin/python benchmarks/zero_points.py --reps 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import host_facts, host_line, update_doc, write_results  # noqa: E402

NAME = "zero_points"
MARKER = "zero-points"
RERUN = ".venv/bin/python benchmarks/zero_points.py"
K, N, BLOCK = 3072, 8192, 32
ROWS = (1, 128)
THREADS = 2


def session(k: int, n: int, bits: int, block: int, b, scales, zp, accuracy_level: int, mins=None):
    """One MatMulNBits; with `mins` [K/block, N] the float_matmul form: no zero points, plus
    ReduceSum(Reshape(A, [0, K/block, block])) @ mins added to its output."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
        inputs.append("Z")
    attrs = dict(K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)
    if mins is None:
        nodes = [helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", **attrs)]
    else:
        inits += [
            numpy_helper.from_array(mins, "M"),
            numpy_helper.from_array(np.array([0, k // block, block], dtype=np.int64), "shape"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
        ]
        nodes = [
            helper.make_node("MatMulNBits", inputs, ["codes"], domain="com.microsoft", **attrs),
            helper.make_node("Reshape", ["A", "shape"], ["blocks"]),
            helper.make_node("ReduceSum", ["blocks", "axes"], ["sums"], keepdims=0),
            helper.make_node("MatMul", ["sums", "M"], ["minimums"]),
            helper.make_node("Add", ["codes", "minimums"], ["Y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def codes(rng, k: int, n: int, bits: int, block: int):
    nb = k // block
    q = rng.integers(0, 2**bits, (n, nb, block), dtype=np.uint8)
    b = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8) if bits == 4 else q
    scales = rng.uniform(0.001, 0.05, (n, nb)).astype(np.float32)
    return q, b, scales


def arithmetic() -> dict:
    rng = np.random.default_rng(0)
    k, n, block = 96, 16, 32
    q, b, scales = codes(rng, k, n, 4, block)
    zp = rng.uniform(-3.0, 18.0, scales.shape).astype(np.float32)  # outside [0, 15] too
    kernel_order = (q.astype(np.float32) * scales[..., None] + (-(scales * zp))[..., None]).reshape(n, k)
    textbook = ((q.astype(np.float64) - zp[..., None]) * scales[..., None]).reshape(n, k)
    out: dict = {}
    for level in (0, 4):
        got = session(k, n, 4, block, b, scales, zp, level).run(None, {"A": np.eye(k, dtype=np.float32)})[0].T
        out[f"accuracy_level_{level}"] = {
            "max_abs_diff_vs_q_s_minus_s_z": float(np.abs(got - kernel_order).max()),
            "max_abs_diff_vs_q_minus_z_times_s": float(np.abs(got - textbook).max()),
            "max_abs_weight": float(np.abs(textbook).max()),
        }
    q8, b8, s8 = codes(rng, k, n, 8, block)
    try:
        session(k, n, 8, block, b8, s8, rng.uniform(0, 255, s8.shape).astype(np.float32), 4).run(
            None, {"A": np.eye(k, dtype=np.float32)}
        )
        out["bits_8"] = "accepted"
    except Exception as e:  # noqa: BLE001 - the refusal is the result
        # onnxruntime's message ends with the reason, after the failed enforce's expression
        out["bits_8"] = f"refused ({str(e).splitlines()[0].split(' was false. ')[-1][:200]})"
    return out


def speed(reps: int) -> list[dict]:
    rng = np.random.default_rng(1)
    q, b, scales = codes(rng, K, N, 4, BLOCK)
    nb = K // BLOCK
    zp_int = rng.integers(0, 16, (N, nb), dtype=np.uint8)
    zp_packed = (zp_int[:, 0::2] | (zp_int[:, 1::2] << 4)).astype(np.uint8)
    zp_float = rng.uniform(0.0, 15.0, (N, nb)).astype(np.float32)
    mins = rng.standard_normal((nb, N)).astype(np.float32) * 0.01
    rows = []
    for label, zp, m_ in (
        ("uint8 zero points", zp_packed, None),
        ("float zero points", zp_float, None),
        ("float_matmul (symmetric + block sums @ minimums)", None, mins),
    ):
        t0 = time.perf_counter()
        sess = session(K, N, 4, BLOCK, b, scales, zp, 4, m_)
        load_s = time.perf_counter() - t0
        for m in ROWS:
            a = rng.standard_normal((m, K)).astype(np.float32)
            sess.run(None, {"A": a})  # warm-up
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                sess.run(None, {"A": a})
                times.append((time.perf_counter() - t) * 1000)
            rows.append(
                {
                    "zero_points": label,
                    "rows": m,
                    "median_ms": round(statistics.median(times), 3),
                    "min_ms": round(min(times), 3),
                    "session_s": round(load_s, 3),
                }
            )
            print(f"[{NAME}] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def markdown(doc: dict) -> str:
    a = doc["arithmetic"]
    lines = [
        f"onnxruntime {doc['onnxruntime']}, {doc['date']}, {doc['host_line']}; 1-minute load average "
        f"{doc['load_before']:.2f} before, {doc['load_after']:.2f} after, on {doc['host']['logical_cores']} cores.",
        "",
        "What a float zero point means (one-node MatMulNBits, A = identity, against numpy):",
        "",
        "| accuracy_level | max abs diff vs q·s − s·z | vs (q − z)·s | largest weight |",
        "|---|---|---|---|",
    ]
    for level in (0, 4):
        r = a[f"accuracy_level_{level}"]
        lines.append(
            f"| {level} | {r['max_abs_diff_vs_q_s_minus_s_z']:.3g} | {r['max_abs_diff_vs_q_minus_z_times_s']:.3g} "
            f"| {r['max_abs_weight']:.3g} |"
        )
    lines += [
        "",
        f"8-bit codes with float zero points: {a['bits_8']}.",
        "",
        f"One {K} x {N} MatMul, int4, block {BLOCK}, accuracy_level 4, {THREADS} threads, median of "
        f"{doc['reps']} runs after a warm-up:",
        "",
        "| zero points | rows | median ms | min ms | x uint8 |",
        "|---|---|---|---|---|",
    ]
    base = {r["rows"]: r["median_ms"] for r in doc["speed"] if r["zero_points"].startswith("uint8")}
    for r in doc["speed"]:
        lines.append(
            f"| {r['zero_points']} | {r['rows']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
            f"{r['median_ms'] / base[r['rows']]:.1f} |"
        )
    lines += ["", f"Rerun: `{RERUN}`."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--render", action="store_true", help="tables again from results/zero_points.json")
    args = ap.parse_args()
    import onnxruntime as ort

    if args.render:
        from _common import RESULTS

        md = markdown(json.loads((RESULTS / f"{NAME}.json").read_text()))
        print(md)
        update_doc(MARKER, md)
        return 0

    load_before = os.getloadavg()[0]
    doc = {
        "date": dt.date.today().isoformat(),
        "host": host_facts(),
        "host_line": host_line(host_facts()),
        "onnxruntime": ort.__version__,
        "reps": args.reps,
        "load_before": load_before,
        "arithmetic": arithmetic(),
        "speed": speed(args.reps),
    }
    doc["load_after"] = os.getloadavg()[0]
    md = markdown(doc)
    print(md)
    write_results(NAME, doc, md)
    update_doc(MARKER, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
