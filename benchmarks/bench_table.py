"""The README's benchmark table: SmolLM2-135M in both formats on this machine, laptop-cpu profile.

Runs `edgekit bench` (edgekit.api.bench, one fresh child process per bundle) on the bundles in
dist/bench/ (exported with edgekit.api.export if absent) and reports prefill and decode
tokens/sec, time to first token, peak RSS and bandwidth utilization: medians with the sample
standard deviation over --reps timed trials after one warm-up. The records also go into each
bundle's manifest.json, as `edgekit bench` does.

Writes benchmarks/results/bench_table.{json,md} and the section (README.md or docs/*.md) between
<!-- bench:start --> and <!-- bench:end -->.

Usage:
    .venv/bin/python benchmarks/bench_table.py              # 10 reps, about a minute
    .venv/bin/python benchmarks/bench_table.py --reps 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import ROOT, host_facts, host_line, update_doc, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

NAME = "bench_table"
MODEL = "smollm2-135m"
FORMATS = ("gguf-q4_k_m", "onnx-int4")
PROFILE = "laptop-cpu"
BUNDLES = ROOT / "dist" / "bench"
RERUN = ".venv/bin/python benchmarks/bench_table.py"


def ensure_bundles() -> list[Path]:
    return list(_common.ensure_bundles(NAME, MODEL, FORMATS, BUNDLES).values())


def render(doc: dict) -> str:
    records = doc["records"]
    r0 = records[0]
    runtimes = ", ".join(sorted({f"{k} {v}" for r in records for k, v in r["runtime"].items()}))
    lines = [
        f"Measured on {doc['date']} on {host_line(doc['host'])}: `edgekit bench --profile {PROFILE} "
        f"--reps {r0['reps']}` on {MODEL} ({r0['threads']} threads, context {r0['context']}, "
        f"{r0['prompt_tokens']}-token prompt, {r0['gen_tokens']} generated tokens, greedy, EOS ignored; "
        f"median ± sample stddev of {r0['reps']} trials after {r0['warmup']} warm-up, each bundle in a fresh "
        f"process). {runtimes}. The machine is shared with other jobs, so expect noise: the 1-minute load "
        f"average was {doc['load_avg'][0]} before and {doc['load_avg'][1]} after the run, on "
        f"{doc['host']['logical_cores']} cores. Rerun: `{RERUN}`.",
        "",
        "| format | prefill tok/s | decode tok/s | TTFT ms | peak RSS MiB | bandwidth utilization | model MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['format']} | {r['prefill_tok_s']:.0f} ± {r['prefill_tok_s_stddev']:.0f} | "
            f"{r['decode_tok_s']:.1f} ± {r['decode_tok_s_stddev']:.1f} | {r['ttft_ms']:.0f} ± {r['ttft_ms_stddev']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['bandwidth_utilization']:.0%} | {r['model_bytes'] / 2**20:.0f} |"
        )
    lines += [
        "",
        f"Peak RSS is the benchmark process's own peak (interpreter, runtime and model; its KV cache is "
        f"sized for the profile's context of {r0['context']}). Bandwidth utilization is decode tok/s x bytes "
        f"read per token (model weights + the KV cache at the average position) / this host's read bandwidth, "
        f"{r0['read_bandwidth_gbs']:.1f} GB/s measured with numpy sums over a 512 MB buffer. Whether these "
        f"numbers are the runtimes' own and not the harness's: `benchmarks/harness_overhead.py` "
        f"(results in `benchmarks/results/harness_overhead.md`).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="timed trials per bundle after one warm-up (default 10)")
    args = ap.parse_args()

    from edgekit import api
    from edgekit.progress import RichProgress

    bundles = ensure_bundles()
    load = [round(os.getloadavg()[0], 2)]
    records = api.bench(bundles, profile=PROFILE, reps=args.reps, progress=RichProgress())
    load.append(round(os.getloadavg()[0], 2))
    doc = {
        "host": host_facts(),
        "date": dt.date.today().isoformat(),
        "model": MODEL,
        "profile": PROFILE,
        "load_avg": load,
        "records": [r.to_dict() for r in records],
    }
    md = render(doc)
    write_results(NAME, doc, md)
    update_doc("bench", md)
    print(md)


if __name__ == "__main__":
    main()
