"""Speed of onnx-int4's weight re-quantization search (requant.quantize_blocks), old vs new.

The search (edgekit/formats/onnx_int4/requant.py) is most of an onnx-int4 export's time at
Phi-3-mini size (161 MatMul weights). This script times it on random N(0, 0.02) float32
weights of Phi-3-mini's shapes, the recipe's default form (4 bits, float zero points, block 32,
a random positive importance vector, float32 scales) and the int8 lm_head (8 bits, integer zero
points), against the implementation at BASE (read with `git show`, loaded as a temporary module;
the package keeps one implementation), in the same run:

- seconds per tensor and elements/s, old and new (new with 1 and with 2 threads), and ratios;
- two tensors at once on two threads, as nodequant.ordered_map runs an export's nodes;
- the weighted squared error the search minimises (sum over blocks), old vs new, the blocks
  where new is worse, and whether the outputs are byte-identical.

Writes benchmarks/results/requant_speed.{json,md}.

Usage:
    .venv/bin/python benchmarks/requant_speed.py               # ~5 min on 2 idle cores
    .venv/bin/python benchmarks/requant_speed.py --no-lm-head  # skip the [32064, 3072] int8 tensor
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, host_facts, host_line, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
from edgekit.formats.onnx_int4.requant import quantize_blocks  # noqa: E402

NAME = "requant_speed"
BASE = "5b9a90f"  # the last commit with the whole-tensor float64 search
BLOCK = 32
# (label, rows, cols, bits, zero points): Phi-3-mini's MatMul weights
SHAPES = [
    ("qkv part / o_proj", 3072, 3072, 4, "float"),
    ("gate or up half of gate_up", 8192, 3072, 4, "float"),
    ("down_proj", 3072, 8192, 4, "float"),
]
LM_HEAD = ("lm_head (int8)", 32064, 3072, 8, "integer")


def load_old(base: str):
    """quantize_blocks as it was at `base`, from git, as a throwaway module."""
    src = subprocess.run(
        ["git", "show", f"{base}:edgekit/formats/onnx_int4/requant.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "requant_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("requant_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.quantize_blocks


def weighted_error(w: np.ndarray, importance: np.ndarray | None, q, scale, zp) -> np.ndarray:
    """Per-block weighted squared error of (q - zp) * scale against w, with the search's weights, in float64."""
    n, k = w.shape
    nb = -(-k // BLOCK)
    x = np.pad(w.astype(np.float64), ((0, 0), (0, nb * BLOCK - k))).reshape(n, nb, BLOCK)
    sigma2 = (x * x).mean(-1, keepdims=True)
    if importance is not None:
        imp = np.pad(importance.astype(np.float64), (0, nb * BLOCK - k)).reshape(nb, BLOCK)
        wts = imp * np.sqrt(sigma2 + x * x)
    else:
        wts = np.sqrt(sigma2) + np.abs(x)
    deq = (q.astype(np.float64) - zp.astype(np.float64)[..., None]) * scale.astype(np.float64)[..., None]
    return (wts * (deq - x) ** 2).sum(-1)


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def concurrent(fn, jobs) -> float:
    """Wall time of fn(*job) for every job at once, one thread each (ordered_map's situation)."""
    threads = [threading.Thread(target=fn, args=job) for job in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def tensor(rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 0.02, (rows, cols)).astype(np.float32)
    importance = rng.uniform(0.01, 1.0, cols).astype(np.float32) ** 2  # an imatrix: mean x^2 per column
    return w, importance


def run(args) -> dict:
    old = load_old(args.base)
    shapes = SHAPES + ([] if args.no_lm_head else [LM_HEAD])
    load_before = os.getloadavg()
    rows = []
    for i, (label, n, k, bits, zp_form) in enumerate(shapes):
        w, imp = tensor(n, k, i)
        importance = imp if zp_form == "float" else None  # the lm_head: the builder's plain int8 search
        call = (w, bits, BLOCK, importance, zp_form, "float32")
        t_old, r_old = timed(old, *call)
        t_new1, r_new = timed(quantize_blocks, *call, workers=1)
        t_new2, r_new2 = timed(quantize_blocks, *call, workers=2)
        e_old, e_new = weighted_error(w, importance, *r_old), weighted_error(w, importance, *r_new)
        row = {
            "label": label,
            "shape": [n, k],
            "bits": bits,
            "zero_points": zp_form,
            "importance": importance is not None,
            "elements": n * k,
            "old_s": t_old,
            "new_1thread_s": t_new1,
            "new_2threads_s": t_new2,
            "speedup_1thread": t_old / t_new1,
            "speedup_2threads": t_old / t_new2,
            "old_error": float(e_old.sum()),
            "new_error": float(e_new.sum()),
            "blocks": int(e_old.size),
            "blocks_worse": int((e_new > e_old * (1 + 1e-9)).sum()),
            "blocks_better": int((e_new < e_old * (1 - 1e-9)).sum()),
            "identical": all(np.array_equal(a, b) for a, b in zip(r_old, r_new)),
            "threads_identical": all(np.array_equal(a, b) for a, b in zip(r_new, r_new2)),
            "load_1min": os.getloadavg()[0],
        }
        rows.append(row)
        print(
            f"[{NAME}] {label} {n}x{k} int{bits}: old {t_old:.2f} s, new {t_new1:.2f} s (x{row['speedup_1thread']:.1f}), "
            f"2 threads {t_new2:.2f} s (x{row['speedup_2threads']:.1f}); error old {row['old_error']:.6e} "
            f"new {row['new_error']:.6e}; identical {row['identical']}; load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
        )
    # two [3072, 3072] tensors at once, one thread each: what an export's two node workers do
    pair = [tensor(3072, 3072, 10 + j) for j in range(2)]
    jobs = [(w, 4, BLOCK, imp, "float", "float32") for w, imp in pair]
    t_pair_old = concurrent(old, jobs)
    t_pair_new = concurrent(quantize_blocks, jobs)
    single_old = rows[0]["old_s"]
    single_new = rows[0]["new_1thread_s"]
    pair_row = {
        "old_s": t_pair_old,
        "new_s": t_pair_new,
        "speedup": t_pair_old / t_pair_new,
        # 2 tensors in t seconds against 2 x one tensor's time alone: 2.0 is perfect use of 2 cores
        "old_parallel_gain": 2 * single_old / t_pair_old,
        "new_parallel_gain": 2 * single_new / t_pair_new,
    }
    print(f"[{NAME}] two 3072x3072 at once: old {t_pair_old:.2f} s, new {t_pair_new:.2f} s", file=sys.stderr)
    facts = host_facts()
    return {
        "date": dt.date.today().isoformat(),
        "base": args.base,
        "host": facts,
        "host_line": host_line(facts),
        "numpy": np.__version__,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rows": rows,
        "pair": pair_row,
    }


def render(doc: dict) -> str:
    lb, la = doc["load_before"], doc["load_after"]
    lines = [
        f"# quantize_blocks speed, old ({doc['base']}) vs new",
        "",
        f"{doc['date']}, {doc['host_line']}, numpy {doc['numpy']}; load average (1/5/15 min) "
        f"{lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} before, {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} after, on "
        f"{doc['host']['logical_cores']} cores. Generated by `benchmarks/requant_speed.py`; one timed call each, "
        "random N(0, 0.02) float32 weights, block 32, float32 scales.",
        "",
        "| tensor | shape | form | old s | new s (1 thread) | new s (2 threads) | x (1 thread) | x (2 threads) "
        "| new Melem/s (1 thread) | weighted error old | new | blocks worse / better | byte-identical | load after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        load = f"{r['load_1min']:.1f}" if "load_1min" in r else "(not recorded)"
        form = f"int{r['bits']}, {r['zero_points']} zero points" + (", imatrix" if r["importance"] else "")
        lines.append(
            f"| {r['label']} | {r['shape'][0]} x {r['shape'][1]} | {form} | {r['old_s']:.2f} | {r['new_1thread_s']:.2f} "
            f"| {r['new_2threads_s']:.2f} | {r['speedup_1thread']:.1f} | {r['speedup_2threads']:.1f} "
            f"| {r['elements'] / r['new_1thread_s'] / 1e6:.2f} | {r['old_error']:.6e} | {r['new_error']:.6e} "
            f"| {r['blocks_worse']} / {r['blocks_better']} of {r['blocks']} | {'yes' if r['identical'] else 'no'} "
            f"| {load} |"
        )
    p = doc["pair"]
    lines += [
        "",
        "Two 3072 x 3072 tensors at once, one thread each (an export's two node workers, nodequant.ordered_map): "
        f"old {p['old_s']:.2f} s, new {p['new_s']:.2f} s (x{p['speedup']:.1f}); parallel gain over one tensor alone "
        f"(2.0 = both cores fully used) old {p['old_parallel_gain']:.2f}, new {p['new_parallel_gain']:.2f}.",
        "",
        "Weighted error: the sum over blocks of the importance-weighted squared error the search minimises, "
        "in float64. A block counts as worse or better when it differs by more than 1e-9 relative. "
        "Timings move with the load average on a shared machine; the ratios are taken in the same run.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=BASE, help="git revision of the old implementation")
    ap.add_argument("--no-lm-head", action="store_true", help="skip the [32064, 3072] int8 tensor")
    ap.add_argument("--render", action="store_true", help="the table again from results/requant_speed.json")
    args = ap.parse_args()
    if args.render:
        from _common import RESULTS

        doc = json.loads((RESULTS / f"{NAME}.json").read_text())
    else:
        doc = run(args)
    md = render(doc)
    write_results(NAME, doc, md)
    print(md)


if __name__ == "__main__":
    main()
