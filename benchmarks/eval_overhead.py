"""Does `edgekit eval` report what the runtimes do, and nothing of its own?

For SmolLM2-135M in both formats (exported to dist/bench/ if absent), on the shipped task set,
in one run on one machine, with the laptop-cpu profile's threads and context:

  edgekit   `edgekit eval`'s own child process (edgekit.api.evaluate, no reference row, nothing
            written into the manifests), per item: TTFT, end-to-end latency, answer
  raw       a minimal loop written directly on the runtime in its own fresh process, fed the
            same prompt token ids (raw prompts are also re-tokenized by the raw loop and must
            agree), the same max tokens, greedy, stopping at the model's end-of-generation tokens:
            gguf   llama_cpp's C API: llama_model_load_from_file, llama_init_from_model (n_ctx, n_batch =
                   n_ubatch = min(n_ctx, 512), flash attention off, threads), llama_decode of the
                   prompt, then argmax + llama_decode of one token per step; choice items: one
                   batch with logits for every position
            onnx   onnxruntime_genai: Config + threads overlay, Model, GeneratorParams (greedy,
                   max_length = prompt + max tokens), append_tokens, generate_next_token until EOS or
                   the limit; choice items: append_tokens(all) and get_output("logits")

Both sides warm up once the same way (the first generation item, the first choice item).
Rounds are interleaved (edgekit, raw, raw, edgekit, ...); a round's ratio is the sum of
edgekit's per-item end-to-end latencies over the raw loop's (generation items; choice items
separately), and the ratio checked is the median over rounds. Goal (from the issue): latency
ratio within 0.95-1.05 and identical answers (generated text; the chosen choice).

Writes benchmarks/results/eval_overhead.{json,md}.

Usage:
    .venv/bin/python benchmarks/eval_overhead.py               # 3 rounds, about 6 minutes on 2 cores
    .venv/bin/python benchmarks/eval_overhead.py --rounds 5 --limit 100
    .venv/bin/python benchmarks/eval_overhead.py --threads 1   # both sides on one thread: steadier on a
        # machine shared with other jobs (two spinning threads on one free core stall each other)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import ROOT, host_facts, host_line, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NAME = "eval_overhead"
MODEL = "smollm2-135m"
FORMATS = ("gguf-q4_k_m", "onnx-int4")
PROFILE = "laptop-cpu"
BUNDLES = ROOT / "dist" / "bench"
RATIO_RANGE = (0.95, 1.05)
RERUN = ".venv/bin/python benchmarks/eval_overhead.py"


# --------------------------------------------------------------------------------------------
# the raw loops (run as `eval_overhead.py --raw-child JOB`; they import no edgekit code)
# --------------------------------------------------------------------------------------------


def _logsumexp_pick(rows, targets) -> float:
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    rows = rows - rows.max(axis=-1, keepdims=True)
    logp = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    return float(logp[np.arange(len(targets)), targets].sum())


def raw_llama(job: dict) -> dict:
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    model = L.llama_model_load_from_file(job["model"].encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = job["context"]
    cp.n_batch = cp.n_ubatch = min(job["context"], 512)
    cp.n_threads = cp.n_threads_batch = job["threads"]
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    mem = L.llama_get_memory(ctx)

    def tokenize(text: str) -> list[int]:
        b = text.encode()
        buf = (L.llama_token * (len(b) + 16))()
        n = L.llama_tokenize(vocab, b, len(b), buf, len(buf), False, True)
        return list(buf[:n])

    def piece(tok: int) -> bytes:
        import ctypes

        buf = (ctypes.c_char * 256)()
        n = L.llama_token_to_piece(vocab, tok, buf, 256, 0, False)
        return bytes(buf[:n])

    def argmax() -> int:
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).argmax())

    def generate(prompt: list[int], max_tokens: int):
        L.llama_memory_clear(mem, True)
        arr = (L.llama_token * len(prompt))(*prompt)
        one = (L.llama_token * 1)()
        out, first = [], None
        t0 = time.perf_counter()
        assert L.llama_decode(ctx, L.llama_batch_get_one(arr, len(prompt))) == 0
        for i in range(max_tokens):
            tok = argmax()
            if first is None:
                first = time.perf_counter()
            if L.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            if i + 1 < max_tokens:
                one[0] = tok
                assert L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) == 0
        t1 = time.perf_counter()
        return b"".join(piece(t) for t in out).decode("utf-8", "replace"), first - t0, t1 - t0

    def logits(ids: list[int]):
        L.llama_memory_clear(mem, True)
        batch = L.llama_batch_init(len(ids), 0, 1)
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        assert L.llama_decode(ctx, batch) == 0
        rows = (
            np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(ids) * n_vocab,))
            .reshape(len(ids), n_vocab)
            .copy()
        )
        L.llama_batch_free(batch)
        return rows

    return _loop(job, tokenize, generate, logits)


def raw_genai(job: dict) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(job["bundle"])
    config.overlay(
        json.dumps(
            {
                "model": {
                    "decoder": {"session_options": {"intra_op_num_threads": job["threads"], "inter_op_num_threads": 1}}
                }
            }
        )
    )
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    eos = {int(t) for t in tokenizer.eos_token_ids}

    def generate(prompt: list[int], max_tokens: int):
        t0 = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, num_beams=1, repetition_penalty=1.0, max_length=len(prompt) + max_tokens, min_length=0
        )
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        stream, pieces, first, n = tokenizer.create_stream(), [], None, 0
        while n < max_tokens:
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if first is None:
                first = time.perf_counter()
            if tok in eos:
                break
            n += 1
            pieces.append(stream.decode(tok))
            if gen.is_done():
                break
        t1 = time.perf_counter()
        del gen
        return "".join(pieces), first - t0, t1 - t0

    def logits(ids: list[int]):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)
        del gen
        return out.reshape(-1, out.shape[-1])[-len(ids) :]

    return _loop(job, lambda text: [int(t) for t in tokenizer.encode(text)], generate, logits)


def _loop(job: dict, tokenize, generate, logits) -> dict:
    items = job["items"]

    def choice(item) -> tuple[int, float]:
        t0 = time.perf_counter()
        scores = []
        for cont in item["continuations"]:
            full = item["prompt_ids"] + tokenize(cont)
            scores.append(
                _logsumexp_pick(
                    logits(full)[len(item["prompt_ids"]) - 1 : len(full) - 1], full[len(item["prompt_ids"]) :]
                )
            )
        return max(range(len(scores)), key=scores.__getitem__), time.perf_counter() - t0

    gen = next(i for i in items if i["match"] != "choice")
    generate(gen["prompt_ids"], gen["max_tokens"])  # the same warm-up as edgekit's child
    mc = next((i for i in items if i["match"] == "choice"), None)
    if mc:
        choice({**mc, "continuations": mc["continuations"][:1]})
    out = []
    for item in items:
        retok = tokenize(item["prompt"]) == item["prompt_ids"] if item["kind"] == "raw" else None
        if item["match"] == "choice":
            pick, took = choice(item)
            out.append({"id": item["id"], "choice": pick, "e2e_s": took, "retokenized_same": retok})
        else:
            text, ttft, e2e = generate(item["prompt_ids"], item["max_tokens"])
            out.append({"id": item["id"], "answer": text, "ttft_s": ttft, "e2e_s": e2e, "retokenized_same": retok})
    return {"items": out}


def raw_child(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    print(json.dumps(raw_llama(job) if job["format"] == "gguf-q4_k_m" else raw_genai(job)))


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------


def ensure_bundles() -> dict[str, Path]:
    return _common.ensure_bundles(NAME, MODEL, FORMATS, BUNDLES)


def run_edgekit(bundle: Path, limit: int | None, threads: int | None):
    from edgekit import api

    report = api.evaluate(
        [bundle],
        limit=limit,
        profile=PROFILE,
        overrides={"threads": threads} if threads else None,
        reference=False,
        write_manifest=False,
    )
    return report.bundles[0]


def run_raw(fmt: str, bundle: Path, run, items: list[dict]) -> dict:
    job = {
        "format": fmt,
        "bundle": str(bundle),
        "model": str(bundle / "model.gguf"),
        "threads": run.threads,
        "context": run.context,
        "items": items,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, __file__, "--raw-child", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[{NAME}] raw {fmt} loop failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(fmt: str, bundle: Path, rounds: int, limit: int | None, threads: int | None) -> dict:
    from edgekit import host as hostmod
    from edgekit.bench import choose_profile, plan
    from edgekit.tasks import choice_continuation, load_tasks

    tasks = load_tasks(None, limit=limit)
    host = hostmod.facts()
    profile, source, _ = choose_profile(PROFILE, {"threads": threads} if threads else None, host)
    [run] = plan([bundle], profile, source, host, reps=1, warmup=0, prompt_tokens=1, gen_tokens=2)
    sides: dict[str, list] = {"edgekit": [], "raw": []}
    items: list[dict] | None = None
    load = []
    for i in range(rounds):
        load.append(round(os.getloadavg()[0], 2))
        for side in ("edgekit", "raw") if i % 2 == 0 else ("raw", "edgekit"):
            print(f"[{NAME}] {fmt}: round {i + 1}/{rounds}, {side}", file=sys.stderr)
            if side == "edgekit":
                rec = run_edgekit(bundle, limit, threads)
                sides["edgekit"].append(rec)
                if items is None:
                    items = [
                        {
                            **t.to_job(),
                            "prompt_ids": list(r.prompt_ids),
                            "continuations": [choice_continuation(t, c) for c in t.choices],
                        }
                        for t, r in zip(tasks.tasks, rec.items)
                    ]
            else:
                if items is None:  # the raw side needs edgekit's prompt ids: run edgekit first
                    rec = run_edgekit(bundle, limit, threads)
                    items = [
                        {
                            **t.to_job(),
                            "prompt_ids": list(r.prompt_ids),
                            "continuations": [choice_continuation(t, c) for c in t.choices],
                        }
                        for t, r in zip(tasks.tasks, rec.items)
                    ]
                sides["raw"].append(run_raw(fmt, bundle, run, items))
    gen_ids = [t.id for t in tasks.tasks if t.match != "choice"]
    mc_ids = [t.id for t in tasks.tasks if t.match == "choice"]

    def total(side_items, ids, key="e2e_s"):
        by = {x["id"]: x for x in side_items}
        return sum(by[i][key] for i in ids)

    def seconds(rec) -> list[dict]:
        return [{"id": i.id, "e2e_s": i.e2e_ms / 1000, "ttft_s": (i.ttft_ms or 0) / 1000} for i in rec.items]

    ratios = {"generation_e2e": [], "generation_ttft": [], "choice_e2e": []}
    for e, r in zip(sides["edgekit"], sides["raw"]):
        ek = seconds(e)
        ratios["generation_e2e"].append(total(ek, gen_ids) / total(r["items"], gen_ids))
        ratios["generation_ttft"].append(total(ek, gen_ids, "ttft_s") / total(r["items"], gen_ids, "ttft_s"))
        if mc_ids:
            ratios["choice_e2e"].append(total(ek, mc_ids) / total(r["items"], mc_ids))
    e0, r0 = sides["edgekit"][0], sides["raw"][0]
    r_by = {x["id"]: x for x in r0["items"]}
    t_by = {t.id: t for t in tasks.tasks}
    text_diff = [i.id for i in e0.items if i.id in gen_ids and i.answer != r_by[i.id]["answer"]]
    choice_diff = [i.id for i in e0.items if i.id in mc_ids and t_by[i.id].choices[r_by[i.id]["choice"]] != i.answer]
    retok_bad = [x["id"] for x in r0["items"] if x["retokenized_same"] is False]
    stable = all([i.answer for i in e.items] == [i.answer for i in e0.items] for e in sides["edgekit"])
    return {
        "items": len(tasks.tasks),
        "generation_items": len(gen_ids),
        "choice_items": len(mc_ids),
        "threads": run.threads,
        "context": run.context,
        "load_avg_per_round": load,
        "ratios": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
        "ratio": {k: round(statistics.median(v), 3) for k, v in ratios.items() if v},
        "edgekit_gen_e2e_s": [round(total(seconds(e), gen_ids), 2) for e in sides["edgekit"]],
        "raw_gen_e2e_s": [round(total(r["items"], gen_ids), 2) for r in sides["raw"]],
        "edgekit_p95_e2e_ms": [e.e2e_ms_p95 for e in sides["edgekit"]],
        "accuracy": e0.accuracy,
        "answers_differ": text_diff,
        "choices_differ": choice_diff,
        "raw_prompts_retokenized_differently": retok_bad,
        "edgekit_answers_stable_across_rounds": stable,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per side (default 3)")
    ap.add_argument("--limit", type=int, help="only the first N items of the shipped set")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--threads", type=int, help="override the profile's threads (both sides)")
    args = ap.parse_args()
    bundles = ensure_bundles()
    t0 = time.monotonic()
    results = {fmt: compare(fmt, bundles[fmt], args.rounds, args.limit, args.threads) for fmt in args.formats}
    doc = {
        "host": host_facts(),
        "date": dt.date.today().isoformat(),
        "model": MODEL,
        "profile": PROFILE,
        "rounds": args.rounds,
        "limit": args.limit,
        "command": " ".join([RERUN, *sys.argv[1:]]),
        "wall_s": round(time.monotonic() - t0, 1),
        "results": results,
        "goal_ratio_range": RATIO_RANGE,
    }
    md = render(doc)
    write_results(NAME + (f"-t{args.threads}" if args.threads else ""), doc, md)  # a side run keeps the default's file
    print(md)


def render(doc: dict) -> str:
    lo, hi = doc["goal_ratio_range"]
    first = next(iter(doc["results"].values()))
    lines = [
        f"Measured on {doc['date']} on {host_line(doc['host'])}; {doc['model']}, profile {doc['profile']} "
        f"({first['threads']} threads, context {first['context']}); the shipped task set "
        f"({first['items']} items{'' if not doc['limit'] else ', first ' + str(doc['limit'])}: "
        f"{first['generation_items']} generated, {first['choice_items']} scored by likelihood); "
        f"{doc['rounds']} interleaved rounds per side, one warm-up each. Ratio: edgekit's summed per-item latency over "
        f"the raw loop's, median of the per-round ratios. The machine was shared with other jobs; 1-minute load "
        f"average at the start of each round (on {doc['host']['logical_cores']} cores): "
        + "; ".join(f"{f} " + ", ".join(map(str, r["load_avg_per_round"])) for f, r in doc["results"].items())
        + f". Whole run {doc['wall_s']:.0f} s. Rerun: `{doc['command']}`.",
        "",
        "| format | measure | per-round ratios | ratio | goal 0.95-1.05 |",
        "|---|---|---|---|---|",
    ]
    names = {
        "generation_e2e": "generation, end-to-end",
        "generation_ttft": "generation, TTFT",
        "choice_e2e": "choice scoring",
    }
    for fmt, r in doc["results"].items():
        for key, label in names.items():
            if key not in r["ratio"]:
                continue
            ok = "**yes**" if lo <= r["ratio"][key] <= hi else "**no**"
            lines.append(
                f"| {fmt} | {label} | {', '.join(f'{x:.3f}' for x in r['ratios'][key])} | "
                f"{r['ratio'][key]:.3f} | {ok if key != 'generation_ttft' else '(not a goal) ' + ok} |"
            )
    lines += [
        "",
        "| format | accuracy (edgekit) | generated answers differing from the raw loop | choices differing | "
        "raw prompts the raw loop tokenizes differently | edgekit answers identical across rounds |",
        "|---|---|---|---|---|---|",
    ]
    for fmt, r in doc["results"].items():
        lines.append(
            f"| {fmt} | {r['accuracy']:.3f} | {len(r['answers_differ'])} of {r['generation_items']}"
            f"{' (' + ', '.join(r['answers_differ'][:5]) + ')' if r['answers_differ'] else ''} | "
            f"{len(r['choices_differ'])} of {r['choice_items']} | "
            f"{len(r['raw_prompts_retokenized_differently'])} | {r['edgekit_answers_stable_across_rounds']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-child":
        raw_child(sys.argv[2])
    else:
        main()
