"""A GGUF model mapped or read: peak RSS, load time and decode speed in plain llama-cpp-python.

Where llama.cpp repacks weights for the CPU (CPU_REPACK: Q4_K rows interleaved on AVX2/AVX512
x86 and on ARM), a memory-mapped model keeps the file pages it copied from resident beside the
repacked copy (llama.cpp issue 16761), so the process holds the model about twice. edgekit's
sessions read the model instead (use_mmap=False). For each bundle this runs, in a fresh child
each, llama_cpp.Llama(model.gguf, n_ctx=CTX, use_mmap=...) both ways, then 16 greedy tokens:
the child's peak RSS (ru_maxrss), the RSS after load, load seconds and decode tok/s.

    .venv/bin/python benchmarks/gguf_mmap.py BUNDLE [BUNDLE ...]   # results/gguf_mmap.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, host_facts, host_line  # noqa: E402

NAME = "gguf_mmap"
CTX = 4096
TOKENS = 16

CHILD = r"""
import json, resource, sys, time
import psutil, llama_cpp
path, mmap, ctx, n = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, use_mmap=mmap, verbose=False,
                      n_threads=psutil.cpu_count(logical=False), n_threads_batch=psutil.cpu_count(logical=False))
load_s = time.perf_counter() - t0
rss_loaded = psutil.Process().memory_info().rss
prompt = llm.tokenize(b"The capital of France is", add_bos=True)
llm.eval(prompt)
t1 = time.perf_counter()
for _ in range(n):
    tok = llm.sample(temp=0.0)
    llm.eval([tok])
decode = n / (time.perf_counter() - t1)
print(json.dumps({"load_s": load_s, "rss_loaded_mib": rss_loaded / 2**20, "decode_tok_s": decode,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(bundle: Path, mmap: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle / "model.gguf"), "1" if mmap else "0", str(CTX), str(TOKENS)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    args = ap.parse_args()
    rows = []
    for bundle in args.bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        size = (bundle / "model.gguf").stat().st_size / 2**30
        load = os.getloadavg()[0]
        mapped, read = measure(bundle, True), measure(bundle, False)
        rows.append(
            {
                "bundle": bundle.name,
                "model": manifest.get("model", bundle.name),
                "model_gib": round(size, 2),
                "mapped": mapped,
                "read": read,
                "load_before": round(load, 1),
            }
        )
        print(f"[{NAME}] {bundle}: mapped {mapped['peak_rss_mib']:.0f} MiB, read {read['peak_rss_mib']:.0f} MiB")
    doc = {"date": dt.date.today().isoformat(), "host": host_line(host_facts()), "context": CTX, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# GGUF mapped or read (llama-cpp-python, plain)",
        "",
        f"Each way in a fresh process: `Llama(model.gguf, n_ctx={CTX}, use_mmap=...)`, then {TOKENS} greedy",
        "tokens. Peak: the child's ru_maxrss. edgekit's sessions read the model (use_mmap=False).",
        f"Measured {doc['date']} on {doc['host']} (1-minute load average before each row shown).",
        "",
        "| bundle | model GiB | peak RSS mapped | peak RSS read | read / mapped | load s mapped / read | decode tok/s mapped / read | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, d = r["mapped"], r["read"]
        lines.append(
            f"| {r['model']} | {r['model_gib']:.2f} | {m['peak_rss_mib'] / 1024:.2f} GiB | {d['peak_rss_mib'] / 1024:.2f} GiB "
            f"| {d['peak_rss_mib'] / m['peak_rss_mib']:.2f} | {m['load_s']:.1f} / {d['load_s']:.1f} "
            f"| {m['decode_tok_s']:.2f} / {d['decode_tok_s']:.2f} | {r['load_before']} |"
        )
    lines += ["", f"Rerun: `.venv/bin/python benchmarks/{NAME}.py BUNDLE ...`", ""]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
