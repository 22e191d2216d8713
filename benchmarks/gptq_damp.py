"""GPTQ's dampening against the imatrix search, end to end, without exporting.

For each embedded model, every decoder nn.Linear's weight is replaced by its dequantized int4
codes (block 32; the grid of the chosen zero points) from edgekit's imatrix search
(weight_search = "imatrix") or from GPTQ at each dampening, with H from edgekit's calibration
inputs (edgekit.activations: the calibration text, never the evaluation text). The model then
runs the built-in evaluation text in float32 and the mean KLD and top-1 agreement against the
unquantized model are recorded. lm_head is left as it is (both embedded models tie it to the
embedding, which the bundles keep at the builder's codes). Float activations: the bundles' int8
activations (accuracy_level 4) add the same error to every row, so rankings carry over; the
absolute figures are the weights' share only.

Writes benchmarks/results/gptq_damp.{json,md}.

Usage:
    .venv/bin/python benchmarks/gptq_damp.py                      # both models, ~15 min on 2 cores
    .venv/bin/python benchmarks/gptq_damp.py --models gemma3-270m --damps 0.1,0.3 --zero-points float
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, host_facts, host_line, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NAME = "gptq_damp"
EVAL_TOKENS = 1023  # one window of the evaluation text, after BOS
# model -> the zero points of the grid compared: float minimums are the shipped default; on
# SmolLM2 (dequantized from Q4_1) they store its grid exactly whatever the method, so its rows
# use integer zero points, where the methods differ.
GRIDS = {"smollm2-135m": "integer", "gemma3-270m": "float"}


def dequantized(q, s, z, k):
    import numpy as np

    return ((q.astype(np.float64) - z[..., None]) * s[..., None]).reshape(q.shape[0], -1)[:, :k]


def measure(model_name: str, zero_points: str, damps: list[float]) -> list[dict]:
    import numpy as np
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from edgekit.activations import load_or_compute
    from edgekit.checkpoint import resolve
    from edgekit.formats.onnx_int4.gptq import gptq_blocks
    from edgekit.formats.onnx_int4.requant import quantize_blocks
    from edgekit.hftokenizer import load_tokenizer
    from edgekit.reference import default_eval_text

    ck = resolve(model_name)
    acts = load_or_compute(ck)
    tok = load_tokenizer(ck.path, False)
    ids = tok(default_eval_text(), add_special_tokens=False).input_ids[:EVAL_TOKENS]
    x = torch.tensor([[tok.bos_token_id, *ids]] if tok.bos_token_id is not None else [ids])
    model = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        ref = torch.log_softmax(model(x).logits[0].double(), -1)
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}

    def second_moments(name: str):
        file, tensor = acts.index[name]
        with safe_open(str(acts.root / file), "pt") as f:
            xs = f.get_tensor(tensor).float()
        return ((xs.T @ xs) / len(xs)).numpy()

    def run(method: str, damp: float | None) -> dict:
        for name, w0 in original.items():
            w = w0.numpy()
            h = second_moments(name)
            if method == "imatrix":
                codes = quantize_blocks(w, 4, 32, np.diag(h).astype(np.float32), zero_points)
            else:
                codes = gptq_blocks(w, h, 4, 32, zero_points, damp=damp)
            linears[name].weight.data = torch.from_numpy(dequantized(*codes, w.shape[1]).astype(np.float32))
        with torch.inference_mode():
            lp = torch.log_softmax(model(x).logits[0].double(), -1)
        kld = (ref.exp() * (ref - lp)).sum(-1)
        return {
            "model": model_name,
            "zero_points": zero_points,
            "method": method,
            "damp": damp,
            "kld_mean": float(kld.mean()),
            "top1_agreement": float((ref.argmax(-1) == lp.argmax(-1)).double().mean()),
            "positions": int(len(kld)),
            "calibration_tokens": acts.tokens,
        }

    rows = [run("imatrix", None)]
    print(rows[-1], flush=True)
    for d in damps:
        rows.append(run("gptq", d))
        print(rows[-1], flush=True)
    return rows


def markdown(doc: dict) -> str:
    lines = [
        f"Measured {doc['date']} on {doc['host_line']}. Weights replaced by their dequantized int4 codes "
        f"(block 32), float32 activations, lm_head as is; mean KLD and top-1 over {EVAL_TOKENS} tokens of the "
        f"built-in evaluation text against the unquantized model; H from the calibration text. "
        f"Rerun: `.venv/bin/python benchmarks/gptq_damp.py`.",
        "",
        "| model | zero points | method | damp | KLD mean | x imatrix | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r["kld_mean"] for r in doc["rows"] if r["method"] == "imatrix"}
    for r in doc["rows"]:
        damp = "-" if r["damp"] is None else f"{r['damp']:g}"
        lines.append(
            f"| {r['model']} | {r['zero_points']} | {r['method']} | {damp} | {r['kld_mean']:.4f} | "
            f"{r['kld_mean'] / base[r['model']]:.2f} | {r['top1_agreement']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(GRIDS))
    ap.add_argument("--damps", default="0.01,0.1,0.3,1.0")
    ap.add_argument("--zero-points", default=None, help="integer or float (default: per model, GRIDS)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    damps = [float(d) for d in args.damps.split(",")]
    rows = []
    for m in args.models.split(","):
        rows += measure(m, args.zero_points or GRIDS.get(m, "float"), damps)
    host = host_facts()
    doc = {"date": dt.date.today().isoformat(), "host": host, "host_line": host_line(host), "rows": rows}
    text = markdown(doc)
    write_results(NAME, doc, text)
    print(text)


if __name__ == "__main__":
    main()
