"""Phone bundles (onnx-int4 recipe key mobile) against the desktop bundle of the same model.

1. SmolLM2-135M (the embedded model) exported twice with the shipped onnx-int4 recipe, once
   as is and once with `mobile = true`, each verified against the cached fp32 transformers
   reference (built-in evaluation text) and benchmarked on the mobile-onnx profile
   (`edgekit.api.bench`, --reps 3, its 2048 context, 128-token prompt, 64 new tokens; this
   host's cores stand in for the phone's, recorded as substitutions). Figures: the model
   files' bytes, export wall time, the .ort-vs-.onnx logit difference recorded at export,
   parity, load time, peak RSS, decode speed and the profile's budgets.
2. A tiny untied Phi-3 (edgekit.tiny, 2 layers, 512-token vocabulary) exported as a phone
   bundle with the token embedding in float, int8 and int4 (edgekit's GatherBlockQuantized,
   `embeddings`): which model file each bundle ships, bytes and parity. Its sizes are a tiny
   model's: at 64 wide the embedding is a small share (`--embedding` measures Phi-3 shapes).

Writes benchmarks/results/mobile.{json,md} and the section of docs/mobile.md between
<!-- mobile:start --> and <!-- mobile:end -->.

`--folding BUNDLE` measures instead why the conversion leaves constant folding out: the
desktop bundle's model.onnx converted to ORT format with and without it (sizes and the ops
each graph ends with), into benchmarks/results/mobile_folding.{json,md}.

`--embedding` measures the quantized token embedding a phone bundle gets for a model that does
not tie it (recipe key embeddings; edgekit/formats/onnx_int4/embedquant.py): a random-weight
checkpoint with Phi-3-mini's embedding and lm_head (hidden 3072, vocabulary 32064, untied)
but 4 layers with a 2048-wide MLP, exported with the shipped recipe as a desktop bundle (float
embedding) and as phone bundles with the embedding in int8 (what `mobile = true` does) and int4. Per
bundle: model bytes, the embedding's bytes, the logits against the desktop bundle's (max / mean
|difference|, mean KLD and top-1 agreement over one 64-token prefill in onnxruntime; with random
weights only the difference between the two ONNX models means anything, there is no reference
to verify against) and decode speed and peak RSS in onnxruntime-genai (bench, mobile-onnx
profile). Into benchmarks/results/mobile_embedding.{json,md} and docs/mobile.md.

Usage:
    .venv/bin/python benchmarks/mobile.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/mobile.py --embedding   # ~25 min on 2 cores
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
        doc["tiny_embedding"] = {
            kind: export_row(str(tiny), root / f"tiny-{kind}", {"mobile": True, "embeddings": kind}, bench=False)
            for kind in ("float", "int8", "int4")
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
        "Tiny untied Phi-3 phone bundles, token embedding float, int8 and int4:",
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


# --- quantized embeddings of untied models -----------------------------------------------------

EMBED_PROMPT_TOKENS = 64
# Phi-3-mini's embedding and lm_head (32064 x 3072, untied) around a short trunk: 4 layers (the
# streamed export's minimum, whose 3-layer template is quantized by cheap RTN for an untied model)
# and the MLP cut from 8192 to 2048 wide. With 2 layers the builder takes the whole model and
# k-quant-searches lm_head itself: its child passed 5 GiB on a shared 2-core host.
EMBED_LAYERS = 4
EMBED_INTERMEDIATE = 2048
# name -> recipe keys on top of the shipped onnx-int4 recipe
EMBED_BUNDLES = {
    "desktop": {},
    "phone (default: int8 embedding)": {"mobile": True},
    "phone, int4 embedding": {"mobile": True, "embeddings": "int4"},
}


def embedding_checkpoint(out: Path) -> Path:
    """Phi-3-mini's untied 32064 x 3072 embedding and lm_head around a short trunk, random bf16."""
    from dataclasses import replace

    from _scale_models import get_model, write_checkpoint

    base = get_model("phi3-mini")
    config = {**base.config, "num_hidden_layers": EMBED_LAYERS, "intermediate_size": EMBED_INTERMEDIATE}
    model = replace(base, name="phi3-mini-embedding", config=config)
    return write_checkpoint(model, out)


def model_initializer_bytes(bundle: Path) -> dict[str, int]:
    """Initializer name -> bytes, from model.onnx's external data entries or model.ort's tensors."""
    if (bundle / "model.onnx").is_file():
        import onnx

        graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
        sizes = {}
        for t in graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            sizes[t.name] = int(info["length"]) if "length" in info else len(t.raw_data)
        return sizes
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    graph = InferenceSession.InferenceSession.GetRootAs((bundle / "model.ort").read_bytes(), 0).Model().Graph()
    sizes = {}
    for i in range(graph.InitializersLength()):
        t = graph.Initializers(i)
        sizes[t.Name().decode()] = t.RawDataLength()
    return sizes


def prefill_logits(bundle: Path, ids: list[int]):
    import numpy as np
    import onnxruntime as ort

    from edgekit.formats.onnx_int4.mobile import feeds_for

    genai = json.loads((bundle / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(bundle / decoder["filename"]), options, providers=["CPUExecutionProvider"])
    out = session.run(["logits"], feeds_for(session, ids, int(decoder["head_size"])))[0]
    return np.asarray(out, dtype=np.float64)[0]


def logit_difference(a, b) -> dict:
    import numpy as np

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    la, lb = log_softmax(a), log_softmax(b)
    kld = (np.exp(la) * (la - lb)).sum(-1)
    return {
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "mean_abs_logit_diff": float(np.abs(a - b).mean()),
        "kld_mean": float(kld.mean()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


def measure_embedding() -> dict:
    from edgekit import api
    from edgekit.targets import load_targets

    profile = load_targets().profile(PROFILE)
    doc: dict = {
        "date": dt.date.today().isoformat(),
        "host": host_facts(),
        "load_before": list(os.getloadavg()),
        "model": f"random-weight Phi-3-mini shapes (hidden 3072, vocabulary 32064, untied), {EMBED_LAYERS} layers, "
        f"intermediate {EMBED_INTERMEDIATE}",
        "budgets": {k: getattr(profile, k) for k in ("max_peak_rss_mb", "max_bundle_mb", "min_decode_tok_s")},
        "rows": {},
    }
    ids = [(7 * i + 3) % 30000 + 1 for i in range(EMBED_PROMPT_TOKENS)]
    with tempfile.TemporaryDirectory(prefix="edgekit-mobile-embedding-") as tmp:
        root = Path(tmp)
        ckpt = embedding_checkpoint(root / "ckpt")
        reference = None
        for name, keys in EMBED_BUNDLES.items():
            out = root / f"b{len(doc['rows'])}"
            t = time.perf_counter()
            api.export(str(ckpt), "onnx-int4", out, force=True, verify=False, recipe=keys)
            wall = time.perf_counter() - t
            manifest = json.loads((out / "manifest.json").read_text())
            q = manifest["quantization"]
            sizes = model_initializer_bytes(out)
            emb = (q.get("edgekit_requantization") or {}).get("embedding") or {}
            prefix = emb.get("tensor", "model.embed_tokens.weight")
            logits = prefill_logits(out, ids)
            if reference is None:
                reference = logits
            [r] = api.bench([out], profile=PROFILE, reps=REPS, write_manifest=False)
            doc["rows"][name] = {
                "recipe": keys,
                "files": sorted(e["path"] for e in manifest["files"] if e["path"] in MODEL_FILES),
                "model_bytes": model_bytes(manifest),
                "bundle_bytes": sum(int(e["size"]) for e in manifest["files"]),
                "embedding": q["weights"]["embedding"],
                "embedding_bytes": sum(v for k, v in sizes.items() if k.startswith(prefix)),
                "export_wall_s": round(wall, 1),
                "export_peak_rss_mb": manifest["export"].get("peak_rss_mb"),
                "ort_format": {k: v for k, v in (q.get("ort_format") or {}).items() if k != "kv_element_bytes"},
                "vs_desktop": logit_difference(reference, logits),
                "bench": {
                    k: getattr(r, k)
                    for k in ("load_s", "decode_tok_s", "decode_tok_s_stddev", "peak_rss_mb", "threads", "passed")
                },
            }
            print(f"[mobile --embedding] {name}: {doc['rows'][name]}", file=sys.stderr, flush=True)
            del logits
    doc["load_after"] = list(os.getloadavg())
    from importlib.metadata import version

    doc["versions"] = {p: version(p) for p in ("onnxruntime", "onnxruntime-genai", "onnx")}
    return doc


def render_embedding(doc: dict) -> str:
    v = doc["versions"]
    lb, la = doc["load_before"], doc["load_after"]
    lines = [
        f"Measured on {doc['date']} on {host_line(doc['host'])}, onnxruntime {v['onnxruntime']}, "
        f"onnxruntime-genai {v['onnxruntime-genai']}, onnx {v['onnx']}. Shared machine: load average "
        f"(1/5/15 min) {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} before and {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} after, "
        f"on {doc['host']['logical_cores']} cores, beside another benchmark. "
        "Rerun: `.venv/bin/python benchmarks/mobile.py --embedding`.",
        "",
        f"Model: {doc['model']}, **random weights** (N(0, 0.02)): the logit columns compare each bundle "
        f"with the desktop bundle over one {EMBED_PROMPT_TOKENS}-token prefill (there is no trained "
        "reference to verify against), and the speed and memory are those of a short model, where "
        f"lm_head and embedding weigh most. Shipped onnx-int4 recipe; bench on {PROFILE} (median of "
        f"{REPS} after a warm-up, this host's cores in place of the phone's).",
        "",
        "| bundle | embedding | model files | model MiB | embedding MiB | max / mean abs logit diff | KLD | top-1 | "
        "decode tok/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in doc["rows"].items():
        d, b = row["vs_desktop"], row["bench"]
        lines.append(
            f"| {name} | {row['embedding']} | {', '.join(row['files'])} | {mib(row['model_bytes'])} | "
            f"{mib(row['embedding_bytes'])} | {d['max_abs_logit_diff']:.3g} / {d['mean_abs_logit_diff']:.3g} | "
            f"{d['kld_mean']:.2g} | {d['top1_agreement']:.3f} | {b['decode_tok_s']:.1f} ± {b['decode_tok_s_stddev']:.1f} | "
            f"{b['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="re-render the tables from results/mobile.json")
    ap.add_argument("--folding", type=Path, metavar="BUNDLE", help="ORT conversion with and without constant folding")
    ap.add_argument("--embedding", action="store_true", help="quantized embeddings of an untied model (Phi-3 shapes)")
    args = ap.parse_args()
    if args.embedding:
        name = f"{NAME}_embedding"
        doc = json.loads((RESULTS / f"{name}.json").read_text()) if args.render else measure_embedding()
        markdown = render_embedding(doc)
        write_results(name, doc, markdown)
        update_doc(name, markdown)
        print(markdown)
        return
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
