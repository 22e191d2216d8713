"""How long `edgekit eval` takes on the whole shipped task set, and what it finds, for SmolLM2-135M
in both formats plus the unquantized reference (transformers, fp32), on this machine.

The reference's cache entry for these items is removed first, so the reference row is computed
(cold), as on a first run; each step's wall time is taken from eval's own progress steps.
Bundles: dist/bench/smollm2-135m-<format> (exported if absent). Writes
benchmarks/results/eval_full.{json,md} and the README's eval-full block.

Usage:
    .venv/bin/python benchmarks/eval_full.py                 # the profile's threads (laptop-cpu: physical cores)
    .venv/bin/python benchmarks/eval_full.py --threads 1     # robust on a machine shared with other jobs
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import ROOT, host_facts, host_line, update_doc, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NAME = "eval_full"
MODEL = "smollm2-135m"
FORMATS = ("gguf-q4_k_m", "onnx-int4")
BUNDLES = ROOT / "dist" / "bench"
RERUN = ".venv/bin/python benchmarks/eval_full.py"


class _Step:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, completed: float, total: float | None = None) -> None:
        pass


class TimedSteps:
    """A Progress that records each step's wall time (and prints it)."""

    def __init__(self):
        self.steps: dict[str, float] = {}

    @contextmanager
    def step(self, name: str, total: float | None = None):
        t0 = time.monotonic()
        yield _Step()
        self.steps[name] = round(time.monotonic() - t0, 1)
        print(f"[{NAME}] {name}: {self.steps[name]} s", file=sys.stderr)

    def note(self, text: str) -> None:
        print(f"[{NAME}] {text}", file=sys.stderr)


def main() -> None:
    import argparse

    from edgekit import api

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, help="override the profile's threads for the bundles")
    args = ap.parse_args()
    from edgekit.evaluate import reference_cache_path
    from edgekit.tasks import load_tasks

    bundles = list(_common.ensure_bundles(NAME, MODEL, FORMATS, BUNDLES).values())
    tasks = load_tasks()
    refs = api.reference_checkpoints(bundles, None, True, False)  # the same lookup eval does
    from edgekit.evaluate import REFERENCE_THREADS

    for ck in refs.values():
        reference_cache_path(ck, tasks, REFERENCE_THREADS).unlink(missing_ok=True)
    progress = TimedSteps()
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    report = api.evaluate(
        bundles,
        profile="laptop-cpu",
        overrides={"threads": args.threads} if args.threads else None,
        write_manifest=False,
        progress=progress,
    )
    wall = round(time.monotonic() - t0, 1)
    rows = []
    for r in report.references + report.bundles:
        rows.append(
            {
                **{k: v for k, v in r.summary().items() if k not in ("runtime", "by_match")},
                "name": "reference (transformers fp32)" if r.kind == "reference" else Path(r.name).name,
                "by_match": {m.match: f"{m.correct}/{m.n}" for m in r.by_match},
            }
        )
    doc = {
        "host": host_facts(),
        "date": dt.date.today().isoformat(),
        "model": MODEL,
        "tasks": report.tasks,
        "n_items": report.n_items,
        "wall_s": wall,
        "steps_s": progress.steps,
        "threads": report.bundles[0].threads,
        "reference_threads": report.references[0].threads,
        "load_avg_before": round(load0, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "command": " ".join([RERUN, *sys.argv[1:]]),
        "rows": rows,
    }
    md = render(doc)
    write_results(NAME, doc, md)
    update_doc("eval-full", md)
    print(md)


def render(doc: dict) -> str:
    steps = "; ".join(f"{k}: {v:.0f} s" for k, v in doc["steps_s"].items())
    lines = [
        f"Measured on {doc['date']} on {host_line(doc['host'])}: `edgekit eval` of the shipped task set "
        f"(`{doc['tasks']}`, {doc['n_items']} items) on {doc['model']} in both formats plus the reference, "
        f"bundles on {doc['threads']} threads (profile laptop-cpu), the reference on {doc['reference_threads']} "
        f"(computed: its cache entry was removed first). Whole run "
        f"**{doc['wall_s']:.0f} s** ({steps}). The machine was shared with other jobs: 1-minute load average "
        f"{doc['load_avg_before']} before and {doc['load_avg_after']} after, on {doc['host']['logical_cores']} cores. "
        f"Rerun: `{doc['command']}`.",
        "",
        "| row | accuracy [95 % CI] | exact / contains / regex / choice | Δ vs ref | flips lost / gained | McNemar p "
        "| ECE | paraphrase drop | format sensitivity | e2e p50 / p95 ms | TTFT p95 ms | decode tok/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in doc["rows"]:
        bm = r["by_match"]
        lines.append(
            f"| {r['name']} | {r['accuracy']:.3f} [{r['accuracy_low']:.3f}, {r['accuracy_high']:.3f}] | "
            f"{' / '.join(bm.get(m, '-') for m in ('exact', 'contains', 'regex', 'choice'))} | "
            f"{f(r['accuracy_delta'], '+.3f')} | {'-' if r['flips_lost'] is None else str(r['flips_lost']) + ' / ' + str(r['flips_gained'])} | "
            f"{f(r['mcnemar_p'], '.3g')} | {f(r['ece'], '.3f')} | {f(r['paraphrase_drop'], '.3f')} | "
            f"{f(r['format_sensitivity'], '.3f')} | {f(r['e2e_ms_p50'], '.0f')} / {f(r['e2e_ms_p95'], '.0f')} | "
            f"{f(r['ttft_ms_p95'], '.0f')} | {f(r['decode_tok_s'], '.1f')} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
