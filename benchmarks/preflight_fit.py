"""Fit edgekit's preflight RAM and disk ceilings on the exports benchmarks/scale.py measured.

For each format, the edgekit export rows of benchmarks/results/scale.json that finished ("ok")
and were measured by a recorded commit (older rows came from code whose memory use has changed
since) give (fp32 MiB of the checkpoint, process-tree peak RSS MiB, disk growth MiB). A least-
squares line through them, raised until it covers every point, is the ceiling: preflight must not
refuse an export that would fit. The script prints the constants to put in each format's
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

SCALE_JSON = RESULTS / "scale.json"
OUT_MD = RESULTS / "preflight_fit.md"
FORMATS = {"export-onnx": "onnx-int4", "export-gguf": "gguf-q4_k_m"}
MiB = 2**20
GiB_MiB = 1024.0


def points(doc: dict, step: str) -> list[dict]:
    """The rows a fit may use: edgekit's export, finished, measured by a recorded commit."""
    out = []
    for r in doc.get("rows", []):
        if r.get("step") != step or r.get("tool") != "edgekit" or not str(r.get("status", "")).startswith("ok"):
            continue
        if not r.get("commit"):
            continue
        out.append(
            {
                "model": r["model"],
                "fp32_mb": r["params"] * 4 / MiB,
                "ram_mb": r["peak_rss_gib"] * GiB_MiB,
                "disk_mb": r.get("disk_growth_gib", 0.0) * GiB_MiB,
                "commit": r["commit"][:10],
                "date": r.get("date", ""),
            }
        )
    return sorted(out, key=lambda p: p["fp32_mb"])


def covering_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (fixed, slope) raised by the factor that puts every point under it."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    slope = max(slope, 0.0)
    fixed = max(my - slope * mx, 0.0)
    raise_by = max(y / (fixed + slope * x) for x, y in zip(xs, ys, strict=True))
    return fixed * raise_by, slope * raise_by


def fit(doc: dict) -> list[str]:
    machine = host_line(doc["host"]) if doc.get("host") else "the host scale.json names"
    lines = [
        "# Preflight fit",
        "",
        f"From `benchmarks/results/scale.json` (random-weight checkpoints with real models' shapes), measured on {machine}.",
        "Each format's ceiling is the least-squares line through its measured edgekit exports, raised to cover",
        "every point. Estimate / measured must stay between 1.0 and 1.25 (tests/test_faults.py).",
        "",
    ]
    for step, fmt in FORMATS.items():
        pts = points(doc, step)
        lines.append(f"## {fmt}")
        lines.append("")
        if len({round(p["fp32_mb"]) for p in pts}) < 2:
            lines += [f"{len(pts)} usable row(s): not enough sizes to fit.", ""]
            continue
        xs = [p["fp32_mb"] for p in pts]
        ram_fixed, ram_slope = covering_line(xs, [p["ram_mb"] for p in pts])
        disk_fixed, disk_slope = covering_line(xs, [max(p["disk_mb"], 1.0) for p in pts])
        lines.append(
            f"RAM ceiling {ram_fixed:.0f} MiB + {ram_slope:.3f} x fp32 MiB; "
            f"disk {disk_fixed:.0f} MiB + {disk_slope:.3f} x fp32 MiB."
        )
        lines += [
            "",
            "| model | fp32 GiB | peak RSS GiB | estimate GiB | ratio | disk GiB | commit |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in pts:
            est = ram_fixed + ram_slope * p["fp32_mb"]
            lines.append(
                f"| {p['model']} | {p['fp32_mb'] / GiB_MiB:.1f} | {p['ram_mb'] / GiB_MiB:.2f} | {est / GiB_MiB:.2f} | "
                f"{est / p['ram_mb']:.2f} | {p['disk_mb'] / GiB_MiB:.1f} | {p['commit']} |"
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
