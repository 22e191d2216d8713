"""Does `edgekit bench` report what the runtimes do, and nothing of its own?

For SmolLM2-135M in both formats (exported to dist/bench/ if absent, with edgekit.api.export),
in one run on one machine, with the laptop-cpu profile's settings (threads, context, prompt
and generation lengths):

  edgekit   the child `edgekit bench` starts (edgekit.bench.run_child on the same Run the
            command plans), under /usr/bin/time -v
  raw       a minimal loop written directly on the runtime, in its own fresh process, with the
            same prompt tokens (edgekit/data/eval.txt in the runtime's own tokenization,
            repeated), generation length, threads and context; one warm-up, the same reps:
            gguf   llama_cpp's C API: llama_model_load_from_file, llama_init_from_model with the
                   context llama-cpp-python's Llama builds (n_ctx, n_batch = n_ubatch =
                   min(n_ctx, 512), flash attention off, threads), llama_decode of
                   llama_batch_get_one(prompt) timed as prefill, then argmax + llama_decode of
                   one token per step, the whole loop timed as decode
            onnx   onnxruntime_genai: Config + threads overlay, Model, GeneratorParams with
                   max_length = min_length = context, append_tokens timed as prefill, then
                   generate_next_token until the length is reached

Runs are interleaved (edgekit, raw, raw, edgekit, ...) so load drift on a shared machine hits
both sides. Each round pairs two adjacent processes, so its ratio (median of edgekit's trials
over median of the raw loop's) compares runs that saw the same load; the ratio checked is the
median of the per-round ratios. The median over all trials of all rounds is shown beside it:
on a busy machine one slow round moves it far more than it moves the paired ratio.

Goals (from the issue): edgekit's prefill and decode tok/s between 0.95x and 1.05x of the raw
loop's; edgekit's reported peak RSS within 10 % of /usr/bin/time -v's "Maximum resident set
size" of the same child process. Without GNU time at /usr/bin/time the RSS check cannot run:
the script says so in its output and results (install it with `apt-get install -y time`).

Writes benchmarks/results/harness_overhead.{json,md}.

Usage:
    .venv/bin/python benchmarks/harness_overhead.py                 # 5 rounds x 10 reps, about 10 minutes
    .venv/bin/python benchmarks/harness_overhead.py --rounds 5 --reps 20
    .venv/bin/python benchmarks/harness_overhead.py --formats gguf-q4_k_m --threads 1   # a side check,
        # written to results/harness_overhead-gguf-q4_k_m-t1.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import ROOT, host_facts, host_line, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

NAME = "harness_overhead"
MODEL = "smollm2-135m"
FORMATS = ("gguf-q4_k_m", "onnx-int4")
PROFILE = "laptop-cpu"
BUNDLES = ROOT / "dist" / "bench"
EVAL_TEXT = ROOT / "edgekit" / "data" / "eval.txt"
GNU_TIME = "/usr/bin/time"
RATIO_RANGE = (0.95, 1.05)
RSS_TOLERANCE = 0.10
RERUN = ".venv/bin/python benchmarks/harness_overhead.py"


def ensure_bundles() -> dict[str, Path]:
    return _common.ensure_bundles(NAME, MODEL, FORMATS, BUNDLES)


# --------------------------------------------------------------------------------------------
# the raw loops (run as `harness_overhead.py --raw-child ...`; they import no edgekit code)
# --------------------------------------------------------------------------------------------


def _cycle(ids: list[int], n: int) -> list[int]:
    return (ids * math.ceil(n / len(ids)))[:n]


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def raw_llama(bundle: Path, threads: int, context: int, prompt_n: int, gen: int, reps: int, warmup: int) -> list:
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(bundle / "model.gguf").encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = context
    cp.n_batch = cp.n_ubatch = min(context, 512)
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    text = EVAL_TEXT.read_bytes()
    buf = (L.llama_token * (len(text) + 16))()
    n = L.llama_tokenize(vocab, text, len(text), buf, len(buf), False, True)
    prompt = _cycle(list(buf[:n]), prompt_n)
    mem = L.llama_get_memory(ctx)

    def argmax() -> int:
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax())

    def trial():
        L.llama_memory_clear(mem, True)
        arr = (L.llama_token * prompt_n)(*prompt)
        one = (L.llama_token * 1)()
        t0 = time.perf_counter()
        assert L.llama_decode(ctx, L.llama_batch_get_one(arr, prompt_n)) == 0
        t1 = time.perf_counter()
        one[0] = argmax()
        t2 = time.perf_counter()
        for _ in range(gen - 1):
            assert L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) == 0
            one[0] = argmax()
        t3 = time.perf_counter()
        return [t1 - t0, t2 - t0, t3 - t2, gen]

    for _ in range(warmup):
        trial()
    return [trial() for _ in range(reps)]


def raw_genai(bundle: Path, threads: int, context: int, prompt_n: int, gen: int, reps: int, warmup: int) -> list:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(bundle))
    config.overlay(
        json.dumps(
            {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}
        )
    )
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    prompt = np.asarray(
        _cycle([int(t) for t in tokenizer.encode(EVAL_TEXT.read_text(encoding="utf-8"))], prompt_n), dtype=np.int32
    )

    def trial():
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=context, min_length=context)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)
        t1 = time.perf_counter()
        generator.generate_next_token()
        t2 = time.perf_counter()
        for _ in range(gen - 1):
            generator.generate_next_token()
        t3 = time.perf_counter()
        del generator
        return [t1 - t0, t2 - t0, t3 - t2, gen]

    for _ in range(warmup):
        trial()
    return [trial() for _ in range(reps)]


def raw_child(argv: list[str]) -> None:
    fmt, bundle, *nums = argv
    threads, context, prompt_n, gen, reps, warmup = map(int, nums)
    loop = raw_llama if fmt == "gguf-q4_k_m" else raw_genai
    trials = loop(Path(bundle), threads, context, prompt_n, gen, reps, warmup)
    print(json.dumps({"trials": trials, "peak_rss_mb": _vm_hwm_mb()}))


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------


def run_raw(run) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--raw-child",
        run.format,
        run.bundle,
        str(run.threads),
        str(run.context),
        str(run.prompt_tokens),
        str(run.gen_tokens),
        str(run.reps),
        str(run.warmup),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[{NAME}] raw {run.format} loop failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_edgekit(run, with_time: bool) -> dict:
    from edgekit.bench import run_child

    child, output = run_child(run, wrap=[GNU_TIME, "-v"] if with_time else ())
    out = {"trials": child["trials"], "peak_rss_mb": child["peak_rss_mb"], "time_max_rss_mb": None}
    if with_time:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)
        if not m:
            raise SystemExit(f"[{NAME}] no 'Maximum resident set size' in /usr/bin/time -v output:\n{output[-2000:]}")
        out["time_max_rss_mb"] = int(m.group(1)) / 1024
    return out


def rates(trials: list, prompt_tokens: int) -> dict[str, list[float]]:
    return {
        "prefill_tok_s": [prompt_tokens / t[0] for t in trials],
        "decode_tok_s": [(t[3] - 1) / t[2] for t in trials],
        "ttft_ms": [t[1] * 1000 for t in trials],
    }


def compare(fmt: str, run, rounds: int, with_time: bool) -> dict:
    sides: dict[str, list[dict]] = {"edgekit": [], "raw": []}
    load: list[float] = []  # 1-minute load average at the start of each round: how busy the machine was
    for i in range(rounds):
        order = ("edgekit", "raw") if i % 2 == 0 else ("raw", "edgekit")
        load.append(round(os.getloadavg()[0], 2))
        for side in order:
            print(f"[{NAME}] {fmt}: round {i + 1}/{rounds}, {side}", file=sys.stderr)
            sides[side].append(run_edgekit(run, with_time) if side == "edgekit" else run_raw(run))
    metrics = {}
    for metric in ("prefill_tok_s", "decode_tok_s", "ttft_ms"):
        med = {
            s: statistics.median([v for r in runs for v in rates(r["trials"], run.prompt_tokens)[metric]])
            for s, runs in sides.items()
        }
        per_round = {
            s: [statistics.median(rates(r["trials"], run.prompt_tokens)[metric]) for r in runs]
            for s, runs in sides.items()
        }
        round_ratios = [e / r for e, r in zip(per_round["edgekit"], per_round["raw"])]
        metrics[metric] = {
            "edgekit": round(med["edgekit"], 2),
            "raw": round(med["raw"], 2),
            "pooled_ratio": round(med["edgekit"] / med["raw"], 3),
            "ratio": round(statistics.median(round_ratios), 3),
            "round_ratios": [round(x, 3) for x in round_ratios],
            "per_round": {s: [round(v, 2) for v in vals] for s, vals in per_round.items()},
        }
    rss = [
        {
            "edgekit_peak_rss_mb": round(r["peak_rss_mb"], 1),
            "time_max_rss_mb": round(r["time_max_rss_mb"], 1) if r["time_max_rss_mb"] else None,
            "ratio": round(r["peak_rss_mb"] / r["time_max_rss_mb"], 3) if r["time_max_rss_mb"] else None,
        }
        for r in sides["edgekit"]
    ]
    return {
        "metrics": metrics,
        "rss": rss,
        "raw_peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in sides["raw"]],
        "load_avg_per_round": load,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per side (default 5)")
    ap.add_argument("--reps", type=int, default=10, help="timed trials per process after one warm-up (default 10)")
    ap.add_argument(
        "--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="formats to compare (default both)"
    )
    ap.add_argument(
        "--threads", type=int, help="override the profile's threads (default: laptop-cpu's, physical cores)"
    )
    args = ap.parse_args()
    name = NAME
    if args.formats != list(FORMATS) or args.threads:
        # a side check must not overwrite the default run's results
        name = "-".join([NAME, *args.formats] + ([f"t{args.threads}"] if args.threads else []))

    from edgekit import host as hostmod
    from edgekit.bench import choose_profile, plan

    with_time = Path(GNU_TIME).is_file() and os.access(GNU_TIME, os.X_OK)
    if not with_time:
        print(
            f"[{NAME}] GNU time is not installed at {GNU_TIME}: the peak-RSS cross-check CANNOT RUN and is "
            f"reported as not run. Install it (apt-get install -y time) and rerun.",
            file=sys.stderr,
        )
    bundles = ensure_bundles()
    host = hostmod.facts()
    profile, source, _ = choose_profile(PROFILE, {"threads": args.threads} if args.threads else None, host)
    results, settings = {}, {}
    for fmt in args.formats:
        [run] = plan(
            [bundles[fmt]], profile, source, host, reps=args.reps, warmup=1, prompt_tokens=None, gen_tokens=None
        )
        settings = {
            "threads": run.threads,
            "context": run.context,
            "prompt_tokens": run.prompt_tokens,
            "gen_tokens": run.gen_tokens,
            "reps": run.reps,
            "warmup": run.warmup,
            "rounds": args.rounds,
        }
        results[fmt] = compare(fmt, run, args.rounds, with_time)

    facts = host_facts()
    doc = {
        "host": facts,
        "date": dt.date.today().isoformat(),
        "model": MODEL,
        "profile": PROFILE,
        "command": " ".join([RERUN, *sys.argv[1:]]),
        "settings": settings,
        "gnu_time": with_time,
        "results": results,
        "goals": {"ratio_range": RATIO_RANGE, "rss_tolerance": RSS_TOLERANCE},
    }
    md = render(doc)
    write_results(name, doc, md)
    print(md)


def render(doc: dict) -> str:
    s = doc["settings"]
    lo, hi = doc["goals"]["ratio_range"]
    lines = [
        f"Measured on {doc['date']} on {host_line(doc['host'])}; {doc['model']}, profile {doc['profile']}: "
        f"{s['prompt_tokens']} prompt tokens, {s['gen_tokens']} generated, {s['threads']} threads, context "
        f"{s['context']}; {s['rounds']} interleaved rounds per side x {s['reps']} trials after one warm-up. "
        f"edgekit and raw loop columns: medians over all trials; ratio: median of the per-round ratios "
        f"(adjacent processes, same load). A shared machine: other jobs ran meanwhile, so rounds are noisy; "
        f"1-minute load average at the start of each round (on {doc['host']['logical_cores']} cores): "
        + "; ".join(
            f"{fmt} " + ", ".join(str(v) for v in res["load_avg_per_round"]) for fmt, res in doc["results"].items()
        )
        + f". Rerun: `{doc.get('command', RERUN)}`.",
        "",
        "| format | metric | edgekit | raw loop | ratio of all-trial medians | per-round ratios | ratio (paired) | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fmt, res in doc["results"].items():
        for metric, m in res["metrics"].items():
            goal = (
                ("**yes**" if lo <= m["ratio"] <= hi else "**no**") + f" ({lo}-{hi})"
                if metric != "ttft_ms"
                else "(not a goal)"
            )
            rounds = ", ".join(f"{v:.2f}" for v in m["round_ratios"])
            lines.append(
                f"| {fmt} | {metric} | {m['edgekit']} | {m['raw']} | {m['pooled_ratio']:.3f} | {rounds} | "
                f"{m['ratio']:.3f} | {goal} |"
            )
    lines += [
        "",
        "| format | edgekit peak RSS MiB (the child's VmHWM) | /usr/bin/time -v max RSS MiB | ratio | "
        "within 10 % | raw loop's own peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    tol = doc["goals"]["rss_tolerance"]
    for fmt, res in doc["results"].items():
        raw_peak = ", ".join(str(v) for v in res["raw_peak_rss_mb"])
        for r in res["rss"]:
            if r["time_max_rss_mb"] is None:
                lines.append(
                    f"| {fmt} | {r['edgekit_peak_rss_mb']} | not run: no GNU time at {GNU_TIME} | | **not checked** | {raw_peak} |"
                )
            else:
                ok = "**yes**" if abs(r["ratio"] - 1) <= tol else "**no**"
                lines.append(
                    f"| {fmt} | {r['edgekit_peak_rss_mb']} | {r['time_max_rss_mb']} | {r['ratio']:.3f} | {ok} | {raw_peak} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-child":
        raw_child(sys.argv[2:])
    else:
        main()
