"""edgekit bench, the child: `python -m edgekit.bench_child JOB RESULT` loads one bundle, warms
up, and times `reps` generations; the parent (edgekit.bench) turns its figures into a record.

The child is the only process that imports a runtime. Inside it every timed region covers
runtime work only (see the formats' timed_generate): tokenization, token selection for
llama.cpp, text and bookkeeping stay outside.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import childjob
from .bench_plan import Run
from .bundle import read_manifest
from .childjob import emit_mark
from .errors import ToolFailed
from .formats import TimedSession, Trial, backend
from .host import peak_rss_mb, rss_mb

CHILD_MARK = "@edgekit-bench"  # progress lines the child prints for the parent's bar


def prompt_ids(encode: Callable[[str], list[int]], n: int) -> list[int]:
    """n tokens of edgekit's eval text in the runtime's own tokenization, repeated as needed."""
    from .reference import default_eval_text

    ids = list(encode(default_eval_text()))
    if not ids:
        raise ToolFailed("the runtime's tokenizer returned no tokens for the eval text")
    return (ids * math.ceil(n / len(ids)))[:n]


def run_trials(timed_generate: Callable[..., Trial], prompt: Sequence[int],
               gen_tokens: int, reps: int, warmup: int, probe: Callable[[str], None] | None = None,
               on_trial: Callable[[str], None] | None = None) -> list[Trial]:
    """`warmup` untimed generations, then `reps` timed ones; each is exactly one generation of
    exactly gen_tokens tokens. probe sees the last timed trial's stages."""
    for i in range(warmup):
        timed_generate(prompt, gen_tokens)
        if on_trial:
            on_trial(f"warmup {i + 1}/{warmup}")
    trials = []
    for i in range(reps):
        trial = timed_generate(prompt, gen_tokens, probe if i == reps - 1 else None)
        if trial.n_generated != gen_tokens:
            raise ToolFailed(f"a trial generated {trial.n_generated} tokens instead of {gen_tokens}")
        trials.append(trial)
        if on_trial:
            on_trial(f"rep {i + 1}/{reps}")
    return trials


def _mark(text: str) -> None:
    emit_mark(CHILD_MARK, text)


def open_run(run: Run) -> tuple[TimedSession, Callable[..., Trial], dict[str, Any]]:
    """Import the runtime (outside the load timing), then open the bundle in it, timed.
    Returns the session, its timed_generate with the KV cache allocated for the whole
    context (as the profile's app would), and what the child reports about the load."""
    bundle = Path(run.bundle)
    manifest = read_manifest(bundle)  # validated by the parent
    fmt = backend(run.format)
    runtime = fmt.bench_runtime(bundle, manifest, run.context, run.gpu_layers)
    info: dict[str, Any] = {"substitutions": list(runtime.substitutions), "gpu_layers": runtime.gpu_layers,
                            "runtime": runtime.versions, "rss_before_load_mb": rss_mb()}
    t0 = time.perf_counter()
    session = fmt.bench_session(bundle, manifest, run.threads, run.context, runtime.gpu_layers)
    info["load_s"] = time.perf_counter() - t0

    def timed(prompt: Sequence[int], gen_tokens: int, probe: Callable[[str], None] | None = None) -> Trial:
        return session.timed_generate(prompt, gen_tokens, probe, max_length=run.context)

    return session, timed, info


def child_run(run: Run) -> dict[str, Any]:
    session, timed, info = open_run(run)
    _mark("load")
    rss = {"load": rss_mb()}
    try:
        prompt = prompt_ids(session.encode, run.prompt_tokens)  # tokenization: outside every timed region
        trials = run_trials(timed, prompt, run.gen_tokens, run.reps, run.warmup,
                            probe=lambda stage: rss.__setitem__(stage, rss_mb()), on_trial=_mark)
        peak = peak_rss_mb()
    finally:
        session.close()
    return {
        **info,
        "trials": [dataclasses.astuple(t) for t in trials],
        "rss_after_load_mb": rss["load"], "rss_after_prefill_mb": rss["prefill"], "rss_end_mb": rss["decode"],
        "peak_rss_mb": peak,
    }


def run_from_job(job: dict[str, Any]) -> Run:
    fields = {f.name for f in dataclasses.fields(Run)}
    kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in job.items() if k in fields}
    return Run(**kw)


def child_main(argv: Sequence[str]) -> int:
    return childjob.main(argv, lambda job: child_run(run_from_job(job)), lambda job: job.get("bundle", "?"))


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
