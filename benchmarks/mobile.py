"""Phone bundles (onnx-int4 recipe key mobile) against the desktop bundle of the same model.

1. SmolLM2-135M (the embedded model) exported twice with the shipped onnx-int4 recipe, once
   as is and once with `mobile = true`, each verified against the cached fp32 transformers
   reference (built-in evaluation text) and benchmarked on the mobile-onnx profile
   (`edgekit.api.bench`, --reps 3, its 2048 context, 128-token prompt, 64 new tokens; this
   host's cores stand in for the phone's, recorded as substitutions). Figures: the model
   files' bytes, export wall time, the .ort-vs-.onnx logit difference recorded at export,
   parity, load time, peak RSS, decode speed and the profile's budgets.
2. A tiny untied Phi-3 (edgekit.tiny, 2 layers, 512-token vocabulary) exported as a phone
   bundle with `algorithm = "default"` and the token embedding in float, then in int4
   (GatherBlockQuantized, `embeddings = "int4"`): which model file each bundle ships (onnxruntime
   1.32.0 cannot load an int4 tensor from ORT format, so the int4 one keeps model.onnx), bytes
   and parity. Its sizes are a tiny model's: at 64 wide the embedding is a small share.

Writes benchmarks/results/mobile.{json,md} and the section of docs/mobile.md between
<!-- mobile:start --> and <!-- mobile:end -->.

`--folding BUNDLE` measures instead why the conversion leaves constant folding out: the
desktop bundle's model.onnx converted to ORT format with and without it (sizes and the ops
each graph ends with), into benchmarks/results/mobile_folding.{json,md}.

Usage:
    .venv/bin/python benchmarks/mobile.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/mobile.py --render   # tables again from results/mobile.json
    .venv/bin/python benchmarks/mobile.py --folding dist/smollm2-135m-onnx-int4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, host_facts, host_line, update_doc, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

NAME = "mobile"
MODEL = "smollm2-135m"
PROFILE = "mobile-onnx"
REPS = 3
RERUN = ".venv/bin/python benchmarks/mobile.py"
MODEL_FILES = ("model.onnx", "model.onnx.data", "model.ort")


def model_bytes(manifest: dict) -> int:
    return sum(int(e["size"]) for e in manifest["files"] if e["path"] in MODEL_FILES)


def export_row(model: str, out: Path, recipe: dict, bench: bool) -> dict:
    from edgekit import api

    t = time.perf_counter()
    [result] = api.export(model, "onnx-int4", out, force=True, verify=True, recipe=recipe)
    wall = time.perf_counter() - t
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    p = result.parity
    row = {
        "recipe": recipe,
        "files": sorted(e["path"] for e in manifest["files"] if e["path"] in MODEL_FILES),
        "model_bytes": model_bytes(manifest),
        "bundle_bytes": result.size_bytes,
        "export_wall_s": round(wall, 1),
        "embedding": q["weights"]["embedding"],
        "kld_mean": round(p.kld_mean, 4),
        "top1_agreement": round(p.top1_agreement, 4),
        "ppl_ratio": round(p.ppl_ratio, 4),
        "ort_format": q.get("ort_format"),
        "mobile_usability": {k: v for k, v in q.get("mobile_usability", {}).items() if k != "log"},
    }
    if bench:
        [r] = api.bench([out], profile=PROFILE, reps=REPS, write_manifest=False)
        row["bench"] = {
            k: getattr(r, k)
            for k in (
                "load_s",
                "ttft_ms",
                "prefill_tok_s",
                "decode_tok_s",
                "decode_tok_s_stddev",
                "peak_rss_mb",
                "threads",
                "context",
                "prompt_tokens",
                "gen_tokens",
                "passed",
                "budget_failures",
                "substitutions",
            )
        }
    return row


def measure() -> dict:
    from edgekit.targets import load_targets
    from edgekit.tiny import make_tiny

    profile = load_targets().profile(PROFILE)
    doc: dict = {
        "date": dt.date.today().isoformat(),
        "host": host_facts(),
        "load_before": os.getloadavg()[0],
        "budgets": {k: getattr(profile, k) for k in ("max_peak_rss_mb", "max_bundle_mb", "min_decode_tok_s")},
    }
    with tempfile.TemporaryDirectory(prefix="edgekit-mobile-bench-") as tmp:
        root = Path(tmp)
        doc["smollm2"] = {
            "desktop": export_row(MODEL, root / "desktop", {}, bench=True),
            "phone": export_row(MODEL, root / "phone", {"mobile": True}, bench=True),
        }
        tiny = make_tiny("phi3", root / "tiny-phi3")
        base = {"mobile": True, "algorithm": "default"}
        doc["tiny_embedding"] = {
            kind: export_row(str(tiny), root / f"tiny-{kind}", {**base, "embeddings": kind}, bench=False)
            for kind in ("float", "int4")
        }
    doc["load_after"] = os.getloadavg()[0]
    from importlib.metadata import version

    doc["versions"] = {p: version(p) for p in ("onnxruntime", "onnxruntime-genai", "onnx")}
    return doc


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def render(doc: dict) -> str:
    v = doc["versions"]
    lines = [
        f"Measured on {doc['date']} on {host_line(doc['host'])}, onnxruntime {v['onnxruntime']}, "
        f"onnxruntime-genai {v['onnxruntime-genai']}, onnx {v['onnx']}. The machine is shared with other jobs: "
        f"the 1-minute load average was {doc['load_before']:.2f} before and {doc['load_after']:.2f} after, "
        f"on {doc['host']['logical_cores']} cores. Rerun: `{RERUN}`.",
        "",
        f"SmolLM2-135M, shipped onnx-int4 recipe, without and with `mobile = true`; bench on the {PROFILE} "
        f"profile (median of {REPS} after a warm-up, this host's cores in place of the phone's):",
        "",
        "| bundle | model files | model MiB | export s | max logit diff .ort vs .onnx | KLD | top-1 | "
        "load s | peak RSS MiB | decode tok/s | budgets |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in doc["smollm2"].items():
        b = row["bench"]
        ort = row["ort_format"] or {}
        diff = f"{ort['max_abs_logit_diff']:.2g}" if "max_abs_logit_diff" in ort else "-"
        budgets = "pass" if b["passed"] else "fail: " + "; ".join(b["budget_failures"])
        lines.append(
            f"| {name} | {', '.join(row['files'])} | {mib(row['model_bytes'])} | {row['export_wall_s']} | {diff} | "
            f"{row['kld_mean']} | {row['top1_agreement']} | {b['load_s']:.2f} | {b['peak_rss_mb']:.0f} | "
            f"{b['decode_tok_s']:.1f} ± {b['decode_tok_s_stddev']:.1f} | {budgets} |"
        )
    budgets = doc["budgets"]
    lines += [
        "",
        f"Budgets of {PROFILE}: peak RSS <= {budgets['max_peak_rss_mb']} MiB, bundle <= {budgets['max_bundle_mb']} MiB, "
        f"decode >= {budgets['min_decode_tok_s']} tok/s.",
    ]
    usability = doc["smollm2"]["phone"]["mobile_usability"]
    eps = "; ".join(
        f"{ep}: {e['partitions']} partition(s) over {e['supported_nodes']}/{e['nodes']} nodes, {e['suitability']}"
        for ep, e in usability["eps"].items()
    )
    lines += [
        "",
        f"ONNX Runtime's usability checker on SmolLM2's graph: {eps}. Recommended: "
        f"{', '.join(usability['recommended'])}. ONNX Runtime's own ops in the graph: {', '.join(usability['contrib_ops'])}.",
        "",
        'Tiny untied Phi-3 phone bundles, `algorithm = "default"`, token embedding float vs int4:',
        "",
        "| embedding | model files | model bytes | max logit diff .ort vs .onnx | KLD | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for row in doc["tiny_embedding"].values():
        ort = row["ort_format"] or {}
        lines.append(
            f"| {row['embedding']} | {', '.join(row['files'])} | {row['model_bytes']} | "
            f"{ort.get('max_abs_logit_diff', '-')} | {row['kld_mean']} | {row['top1_agreement']} |"
        )
    return "\n".join(lines)


def folding(bundle: Path) -> tuple[dict, str]:
    import tempfile
    from collections import Counter

    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    source = json.loads((bundle / "manifest.json").read_text())["source"]
    model = source.get("alias") or source.get("hub_id") or Path(source.get("path", str(bundle))).name
    doc: dict = {"date": dt.date.today().isoformat(), "host": host_facts(), "model": model, "rows": {}}
    onnx_bytes = sum((bundle / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))
    with tempfile.TemporaryDirectory(prefix="edgekit-folding-") as tmp:
        for name, disabled in (("with constant folding", []), ("without (what edgekit does)", ["ConstantFolding"])):
            out = Path(tmp) / "model.ort"
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = str(out)
            options.add_session_config_entry("session.save_model_format", "ORT")
            options.log_severity_level = 3
            ort.InferenceSession(
                str(bundle / "model.onnx"), options, ["CPUExecutionProvider"], disabled_optimizers=disabled
            )
            graph = InferenceSession.InferenceSession.GetRootAs(out.read_bytes(), 0).Model().Graph()
            ops = Counter(graph.Nodes(i).OpType().decode() for i in range(graph.NodesLength()))
            doc["rows"][name] = {"ort_bytes": out.stat().st_size, "ops": dict(sorted(ops.items()))}
    doc["onnx_bytes"] = onnx_bytes
    lines = [
        f"Measured on {doc['date']} on {host_line(doc['host'])}: the model.onnx of a desktop onnx-int4 bundle of "
        f"{doc['model']} (`edgekit export {doc['model']} --target onnx-int4`; model.onnx + model.onnx.data "
        f"{mib(onnx_bytes)} MiB) converted to ORT format at ORT_ENABLE_EXTENDED. "
        "Rerun: `.venv/bin/python benchmarks/mobile.py --folding BUNDLE`.",
        "",
        "| conversion | model.ort MiB | ops that differ |",
        "|---|---|---|",
    ]
    a, b = (r["ops"] for r in doc["rows"].values())
    differing = sorted(op for op in {*a, *b} if a.get(op) != b.get(op))
    for name, row in doc["rows"].items():
        differ = ", ".join(f"{op} {row['ops'].get(op, 0)}" for op in differing) or "-"
        lines.append(f"| {name} | {mib(row['ort_bytes'])} | {differ} |")
    return doc, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="re-render the tables from results/mobile.json")
    ap.add_argument("--folding", type=Path, metavar="BUNDLE", help="ORT conversion with and without constant folding")
    args = ap.parse_args()
    if args.folding:
        doc, markdown = folding(args.folding)
        write_results(f"{NAME}_folding", doc, markdown)
        print(markdown)
        return
    doc = json.loads((RESULTS / f"{NAME}.json").read_text()) if args.render else measure()
    markdown = render(doc)
    write_results(NAME, doc, markdown)
    update_doc(NAME, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
