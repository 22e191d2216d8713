"""Fit edgekit's preflight RAM and disk ceilings on the exports benchmarks/scale.py measured.

For each format, the edgekit export rows of benchmarks/results/scale.json that finished ("ok")
and were measured by a recorded commit (older rows came from code whose memory use has changed
since) give the process-tree peak RSS and disk growth at known shapes. A streamed export holds a
layer and the big tables, not the model, so RAM is fitted as fixed + a x (largest tensor, fp32
MiB) + b x (one layer, fp32 MiB), least squares with no negative term, then raised until it
covers every point: preflight must not refuse an export that would fit. Disk is a line in the
checkpoint's fp32 MiB, raised the same way. The script prints the constants to put in each format's
PREFLIGHT_COST and every point's estimate / measured ratio, and writes
benchmarks/results/preflight_fit.md. tests/test_faults.py checks the shipped constants against
the same rows: every estimate at or above the measured peak and within +25 % of it.

    .venv/bin/python benchmarks/preflight_fit.py            # print and write the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, host_line  # noqa: E402
from _scale_models import MODELS, tensor_layout  # noqa: E402

from edgekit.preflight import Shapes, shapes_of  # noqa: E402

SCALE_JSON = RESULTS / "scale.json"
OUT_MD = RESULTS / "preflight_fit.md"
FORMATS = {"export-onnx": "onnx-int4", "export-gguf": "gguf-q4_k_m"}
MiB = 2**20
GiB_MiB = 1024.0
# The shipped ceilings sit this far above the covering fit: RSS is sampled every 0.2 s (a spike
# between samples is missed) and another host's allocator, libraries and page cache differ.
HEADROOM = 1.10


def shapes(model: str) -> Shapes:
    """The scale model's shapes as edgekit.preflight reads them from a checkpoint's headers."""
    m = MODELS[model]
    return shapes_of({t.name: _elements(t.shape) for t in tensor_layout(m)}, m.config["num_hidden_layers"])


def _elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def points(doc: dict, step: str) -> list[dict]:
    """The rows a fit may use: edgekit's export, finished, measured by a recorded commit, with its
    importance matrix computed (not read from the cache another step filled)."""
    out = []
    for r in doc.get("rows", []):
        if r.get("step") != step or r.get("tool") != "edgekit" or not str(r.get("status", "")).startswith("ok"):
            continue
        if not r.get("commit") or r["model"] not in MODELS:
            continue
        if r.get("imatrix") == "cached":  # its importance-matrix pass ran in another step: not a whole export
            continue
        if r.get("imatrix_mode") == "memory":
            # The pass held the whole model because this host had the memory free (layerwise.
            # STREAM_SHARE); where memory is short it streams, and that is what the ceiling is for.
            continue
        sh = shapes(r["model"])
        out.append(
            {
                "model": r["model"],
                "fp32_mb": sh.parameters * 4 / MiB,
                "largest_mb": sh.largest * 4 / MiB,
                "layer_mb": sh.layer * 4 / MiB,
                "ram_mb": r["peak_rss_gib"] * GiB_MiB,
                "disk_mb": r.get("disk_growth_gib", 0.0) * GiB_MiB,
                "commit": r["commit"][:10],
                "date": r.get("date", ""),
            }
        )
    return sorted(out, key=lambda p: p["fp32_mb"])


def covering_fit(features: list[list[float]], ys: list[float]) -> list[float]:
    """Coefficients (first: the constant) of a least-squares fit with no negative coefficient
    (a feature whose coefficient would be negative is dropped and the rest refitted), raised by
    the factor that puts every point at or under the fit."""
    import numpy as np

    x = np.array([[1.0, *f] for f in features])
    y = np.array(ys)
    keep = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    full = np.zeros(x.shape[1])
    full[keep] = np.maximum(coef, 0.0)
    raise_by = float(max(y / (x @ full))) * HEADROOM
    return [float(c) * raise_by for c in full]


def fit(doc: dict) -> list[str]:
    machine = host_line(doc["host"]) if doc.get("host") else "the host scale.json names"
    lines = [
        "# Preflight fit",
        "",
        f"From `benchmarks/results/scale.json` (random-weight checkpoints with real models' shapes), measured on {machine}.",
        "RAM: fixed + a x largest tensor + b x one layer (fp32 MiB), least squares with no negative term, raised to",
        f"cover every point, then {HEADROOM:.2f}x. Disk: a line in the checkpoint's fp32 MiB, raised the same way.",
        "The shipped constants must keep every estimate between 1.0 and 1.25x the measured peak (tests/test_faults.py).",
        "",
    ]
    for step, fmt in FORMATS.items():
        pts = points(doc, step)
        lines.append(f"## {fmt}")
        lines.append("")
        if len({round(p["fp32_mb"]) for p in pts}) < 3:
            lines += [f"{len(pts)} usable row(s): not enough sizes to fit.", ""]
            continue
        ram = covering_fit([[p["largest_mb"], p["layer_mb"]] for p in pts], [p["ram_mb"] for p in pts])
        disk = covering_fit([[p["fp32_mb"]] for p in pts], [max(p["disk_mb"], 1.0) for p in pts])
        lines.append(
            f"RAM ceiling: ram_fixed_mb={ram[0]:.0f}, ram_per_largest={ram[1]:.3f}, ram_per_layer={ram[2]:.3f}; "
            f"disk: disk_fixed_mb={disk[0]:.0f}, disk_per_fp32_byte={disk[1]:.3f}."
        )
        lines += [
            "",
            "| model | fp32 GiB | largest tensor MiB | layer MiB | peak RSS GiB | fit GiB | fit / measured | disk GiB | commit |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in pts:
            est = ram[0] + ram[1] * p["largest_mb"] + ram[2] * p["layer_mb"]
            lines.append(
                f"| {p['model']} | {p['fp32_mb'] / GiB_MiB:.1f} | {p['largest_mb']:.0f} | {p['layer_mb']:.0f} | "
                f"{p['ram_mb'] / GiB_MiB:.2f} | {est / GiB_MiB:.2f} | {est / p['ram_mb']:.2f} | "
                f"{p['disk_mb'] / GiB_MiB:.1f} | {p['commit']} |"
            )
        lines.append("")
    return lines


def main() -> None:
    doc = json.loads(SCALE_JSON.read_text())
    text = "\n".join(fit(doc)) + "\n"
    OUT_MD.write_text(text)
    print(text)
    print(f"wrote {OUT_MD.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
