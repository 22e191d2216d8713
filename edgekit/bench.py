"""edgekit bench: prefill and decode tokens/sec, time to first token and peak RSS, per bundle x
device profile, each measured in a fresh child process.

    profile = choose_profile(name, overrides, host)      # or detect: Apple silicon -> m-series
    runs = plan(bundles, profile, ...)                   # every input checked before anything runs
    for run in runs:
        child = run_child(run)          # `python -m edgekit.bench JOB RESULT`: load, warm-up, reps
        record = make_record(run, child, host, bandwidth)   # medians, RSS, bandwidth utilization, budgets
        manifest["bench"][profile][host_id] = record; --output JSONL += record

The child is the only process that imports a runtime, so one model's memory never counts
against another's and the parent stays small. Inside the child every timed region covers
runtime work only: tokenization, token selection for llama.cpp, text and bookkeeping stay
outside (see the timed_generate methods of the two sessions).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import __version__
from .errors import BadInput, GateFailed, ToolFailed

CHILD_MARK = "@edgekit-bench"
DEFAULT_REPS = 5
DEFAULT_WARMUP = 1
# llama.cpp keeps its K/V cache in f16 unless told otherwise (edgekit's session does not).
GGUF_KV_BYTES = 2
_ONNX_ELEM_BYTES = {1: 4, 10: 2, 16: 2, 11: 8}  # onnx TensorProto: FLOAT, FLOAT16, BFLOAT16, DOUBLE


@dataclass(frozen=True)
class Trial:
    """One timed generation: the prompt's forward pass, the first token, the rest."""

    prefill_s: float
    first_token_s: float   # prefill + selecting the first token: time to first token
    decode_s: float        # the n_generated - 1 tokens after the first
    n_generated: int


@dataclass(frozen=True)
class Run:
    """Everything one child needs, resolved from the profile, the bundle and this host."""

    bundle: str
    format: str
    model: str
    profile: str
    profile_source: str            # "requested" | "detected"
    threads: int
    gpu_layers: int
    context: int
    prompt_tokens: int
    gen_tokens: int
    reps: int
    warmup: int
    accuracy_level: int | None     # onnx-int4: what the bundle's MatMulNBits nodes carry
    model_bytes: int
    bundle_bytes: int
    kv_bytes_per_token: int        # K and V, all layers, one position
    max_peak_rss_mb: float | None = None
    max_bundle_mb: float | None = None
    min_decode_tok_s: float | None = None
    substitutions: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchRecord:
    """One bundle on one profile on one host. Rates are medians over `reps` trials after
    `warmup` untimed ones, each with its sample standard deviation, minimum and maximum."""

    bundle: str
    format: str
    model: str
    profile: str
    profile_source: str
    host_id: str
    load_s: float
    ttft_ms: float
    ttft_ms_stddev: float
    ttft_ms_min: float
    ttft_ms_max: float
    prefill_tok_s: float
    prefill_tok_s_stddev: float
    prefill_tok_s_min: float
    prefill_tok_s_max: float
    decode_tok_s: float
    decode_tok_s_stddev: float
    decode_tok_s_min: float
    decode_tok_s_max: float
    peak_rss_mb: float             # the child's own peak (VmHWM): interpreter + runtime + model
    rss_before_load_mb: float      # interpreter and runtime imported, nothing loaded
    rss_after_load_mb: float
    rss_after_prefill_mb: float
    rss_end_mb: float              # at the end of the last trial's decoding
    model_bytes: int
    bundle_bytes: int
    kv_bytes_per_token: int
    bytes_per_token: int           # weights + the KV cache a decode step reads, on average
    read_bandwidth_gbs: float      # this host's measured read bandwidth (10^9 bytes/s)
    bandwidth_utilization: float   # decode_tok_s x bytes_per_token / read bandwidth
    threads: int
    gpu_layers: int
    context: int
    accuracy_level: int | None
    prompt_tokens: int
    gen_tokens: int
    reps: int
    warmup: int
    passed: bool
    budget_failures: tuple[str, ...]
    substitutions: tuple[str, ...]
    notes: tuple[str, ...]
    host: dict[str, Any]
    runtime: dict[str, str]
    trials: tuple[Trial, ...] = field(repr=False)
    edgekit_version: str = __version__
    created_at: str = ""
    # Both runtimes allocate the KV cache for the whole context when the session opens
    # (llama.cpp's n_ctx, onnxruntime-genai's max_length with a shared past/present buffer),
    # so it is kv_bytes_per_token x context, whatever the prompt: `--set context=N` shows
    # the peak at the context an app will use.
    kv_cache_mb: float = 0.0
    kv_share_of_peak: float = 0.0  # kv_cache_mb / peak_rss_mb

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchRecord":
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for key in ("budget_failures", "substitutions", "notes"):
            kw[key] = tuple(kw.get(key, ()))
        kw["trials"] = tuple(Trial(**t) for t in d.get("trials", ()))
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# the parent: inputs -> runs
# --------------------------------------------------------------------------------------------

def detect_profile(host) -> tuple[str, str]:
    """(profile name, why): Apple silicon -> m-series, anything else -> laptop-cpu."""
    if host.apple_silicon:
        return "m-series", f"this host is Apple silicon ({host.cpu})"
    return "laptop-cpu", f"this host is {host.os.split()[0]} {host.machine}, not Apple silicon"


def choose_profile(name: str | None, overrides: dict[str, Any] | None, host):
    """(profile, "requested" | "detected", why): the profile named or detected for this host,
    with `overrides` (--set KEY=VALUE) checked as strictly as targets/profiles.toml."""
    from .targets import _profile, load_targets

    targets = load_targets()
    source, why = "requested", ""
    if name is None:
        name, why = detect_profile(host)
        source = "detected"
    profile = targets.profile(name)
    if overrides:
        table = {k: v for k, v in dataclasses.asdict(profile).items() if k != "name" and v is not None}
        table["formats"] = list(profile.formats)
        table.update(overrides)
        # the same checks as targets/profiles.toml gets: unknown keys and wrong types are errors
        profile = _profile(name, table, f"--set for profile {name}", set(targets.formats))
    return profile, source, why


def discover_bundles(root: Path = Path("dist")) -> list[Path]:
    """Bundle directories under `root` (dist/<bundle> and dist/<group>/<bundle>)."""
    if not root.is_dir():
        return []
    found = [m.parent for pattern in ("*/manifest.json", "*/*/manifest.json") for m in root.glob(pattern)]
    return sorted(p for p in set(found) if not any(part.startswith(".") for part in p.relative_to(root).parts))


def _threads(profile, host) -> tuple[int, list[str]]:
    want = profile.threads
    if want == "physical":
        return host.physical_cores, []
    if want == "performance":
        if host.performance_cores:
            return host.performance_cores, []
        return host.physical_cores, [
            f"threads: the profile asks for the performance-core count; this host does not report one "
            f"(not Apple silicon), so its {host.physical_cores} physical cores"]
    if want < 1:
        raise BadInput(f"threads must be at least 1, got {want}", "Fix threads in the profile or --set threads=N")
    if want > host.logical_cores:
        return host.logical_cores, [
            f"threads: the profile asks for {want}; this host has {host.logical_cores} logical cores, "
            f"so {host.logical_cores}"]
    return int(want), []


def _text_config(manifest: dict[str, Any]) -> dict[str, Any]:
    config = manifest.get("source", {}).get("config") or {}
    return config.get("text_config") or config


def _trained_context(bundle: Path, manifest: dict[str, Any]) -> int | None:
    cfg = _text_config(manifest)
    values = [cfg.get("max_position_embeddings"), cfg.get("n_positions")]
    if manifest["format"] == "onnx-int4":
        try:
            genai = json.loads((bundle / "genai_config.json").read_text(encoding="utf-8"))
            values.append(genai["model"]["context_length"])
        except (OSError, ValueError, KeyError):
            pass
    values = [int(v) for v in values if isinstance(v, int) and v > 0]
    return min(values) if values else None


def _onnx_kv_elem_bytes(bundle: Path) -> int | None:
    """Element size of the graph's past key input (the builder uses fp32 on CPU, fp16 on GPU)."""
    try:
        import onnx

        graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - onnx missing or an unreadable graph: the caller notes it
        return None
    for inp in graph.input:
        if inp.name.startswith("past_key"):
            return _ONNX_ELEM_BYTES.get(inp.type.tensor_type.elem_type)
    return None


def kv_bytes_per_token(manifest: dict[str, Any], elem_bytes: int) -> int | None:
    """K and V for one position across all layers, from manifest["source"]["config"]."""
    cfg = _text_config(manifest)
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return 2 * layers * kv_heads * head_dim * elem_bytes


def _model_bytes(manifest: dict[str, Any]) -> int:
    from .targets import load_targets

    names = {n for n in load_targets().format(manifest["format"]).model_files if not n.endswith(".json")}
    return sum(int(e["size"]) for e in manifest["files"] if e["path"] in names)


def _model_name(bundle: Path, manifest: dict[str, Any]) -> str:
    src = manifest.get("source", {})
    return src.get("alias") or src.get("hub_id") or (Path(src["path"]).name if src.get("path") else bundle.name)


def plan(bundles: Sequence[str | Path], profile, profile_source: str, host, *, reps: int, warmup: int,
         prompt_tokens: int | None, gen_tokens: int | None, notes: list[str] | None = None) -> list[Run]:
    """Check every input and resolve one Run per bundle; raises before anything runs.
    Bundles found in dist/ that the profile does not take are skipped, with a line in `notes`."""
    from .bundle import bundle_size, validate

    prompt_tokens = profile.prompt_tokens if prompt_tokens is None else prompt_tokens
    gen_tokens = profile.gen_tokens if gen_tokens is None else gen_tokens
    if prompt_tokens < 1:
        raise BadInput(f"--prompt-tokens must be at least 1, got {prompt_tokens}", "Pass a positive number")
    if gen_tokens < 2:
        raise BadInput(f"--gen-tokens must be at least 2 (decode speed is measured after the first token), "
                       f"got {gen_tokens}", "Pass 2 or more")
    discovered = not bundles
    if discovered:
        bundles = discover_bundles()
        if not bundles:
            raise BadInput("no bundles given and none found in dist/", "Pass bundle directories, e.g. edgekit bench dist/my-bundle")
    threads, thread_subs = _threads(profile, host)
    runs = []
    for b in bundles:
        bundle = Path(b)
        manifest = validate(bundle)  # hashes and file list, before any runtime sees the files
        fmt = manifest["format"]
        if fmt not in profile.formats:
            if discovered:
                if notes is not None:
                    notes.append(f"skipping {bundle}: profile {profile.name} takes {', '.join(profile.formats)}, not {fmt}")
                continue
            raise BadInput(f"profile {profile.name} does not take {fmt} bundles ({bundle})",
                           f"It takes {', '.join(profile.formats)}; choose another --profile")
        trained = _trained_context(bundle, manifest)
        context = min(profile.context, trained) if trained else profile.context
        if prompt_tokens + gen_tokens > context:
            whose = f"profile {profile.name}" if context == profile.context else "the model's trained context"
            raise BadInput(f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} = {prompt_tokens + gen_tokens} "
                           f"exceed the context of {context} ({whose}) for {bundle}",
                           "Lower --prompt-tokens or --gen-tokens")
        subs, notes = list(thread_subs), []
        accuracy = None
        if fmt == "onnx-int4":
            accuracy = manifest.get("quantization", {}).get("accuracy_level")
            if profile.accuracy_level is not None and accuracy != profile.accuracy_level:
                subs.append(f"accuracy_level: the profile asks for {profile.accuracy_level}; the bundle's MatMulNBits "
                            f"nodes carry {accuracy}, fixed at export, so it ran with {accuracy} (re-export with "
                            f"--set accuracy_level={profile.accuracy_level})")
            elem = _onnx_kv_elem_bytes(bundle)
        else:
            elem = GGUF_KV_BYTES
        kv = kv_bytes_per_token(manifest, elem) if elem else None
        if kv is None:
            notes.append("KV cache size unknown (config or graph unreadable): bandwidth utilization counts weights only")
        runs.append(Run(
            bundle=str(bundle), format=fmt, model=_model_name(bundle, manifest), profile=profile.name,
            profile_source=profile_source, threads=threads,
            gpu_layers=profile.gpu_layers if fmt == "gguf-q4_k_m" else 0,  # profiles run ONNX on the CPU
            context=context, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, reps=reps, warmup=warmup,
            accuracy_level=accuracy, model_bytes=_model_bytes(manifest), bundle_bytes=bundle_size(manifest),
            kv_bytes_per_token=kv or 0, max_peak_rss_mb=profile.max_peak_rss_mb, max_bundle_mb=profile.max_bundle_mb,
            min_decode_tok_s=profile.min_decode_tok_s, substitutions=tuple(subs), notes=tuple(notes),
        ))
    if not runs:
        raise BadInput(f"none of the bundles in dist/ is a {' or '.join(profile.formats)} bundle",
                       "Pass bundle directories, or choose another --profile")
    return runs


# --------------------------------------------------------------------------------------------
# the parent: one child per run
# --------------------------------------------------------------------------------------------

def run_child(run: Run, wrap: Sequence[str] = (), on_mark: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """Run one benchmark in a fresh `python -m edgekit.bench` process (prefixed by `wrap`, e.g.
    /usr/bin/time -v). Returns the child's result and everything it printed (marks removed)."""
    from . import childjob

    return childjob.run("edgekit.bench", dataclasses.asdict(run), f"the benchmark process for {run.bundle}",
                        CHILD_MARK, wrap=wrap, on_mark=on_mark)


def _stats(values: Sequence[float], digits: int) -> tuple[float, float, float, float]:
    """median, sample standard deviation (0 for one value), min, max."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return tuple(round(v, digits) for v in (statistics.median(values), sd, min(values), max(values)))  # type: ignore[return-value]


def make_record(run: Run, child: dict[str, Any], host, bandwidth_gbs: float) -> BenchRecord:
    trials = tuple(Trial(*t) for t in child["trials"])
    ttft = _stats([t.first_token_s * 1000 for t in trials], 2)
    prefill = _stats([run.prompt_tokens / max(t.prefill_s, 1e-9) for t in trials], 2)
    decode = _stats([(t.n_generated - 1) / max(t.decode_s, 1e-9) for t in trials], 2)
    # A decode step reads every weight once and the KV cache of the positions before it;
    # on average over the run that is prompt + gen/2 positions.
    bytes_per_token = int(run.model_bytes + run.kv_bytes_per_token * (run.prompt_tokens + run.gen_tokens / 2))
    utilization = round(decode[0] * bytes_per_token / (bandwidth_gbs * 1e9), 3) if bandwidth_gbs > 0 else 0.0
    peak = round(child["peak_rss_mb"], 1)
    kv_mb = round(run.kv_bytes_per_token * run.context / 2**20, 1)
    failures = []
    if run.max_peak_rss_mb is not None and peak > run.max_peak_rss_mb:
        failures.append(f"peak RSS {peak:.1f} MB > max_peak_rss_mb {run.max_peak_rss_mb:g}")
    if run.max_bundle_mb is not None and run.bundle_bytes / 2**20 > run.max_bundle_mb:
        failures.append(f"bundle {run.bundle_bytes / 2**20:.1f} MB > max_bundle_mb {run.max_bundle_mb:g}")
    if run.min_decode_tok_s is not None and decode[0] < run.min_decode_tok_s:
        failures.append(f"decode {decode[0]:.1f} tok/s < min_decode_tok_s {run.min_decode_tok_s:g}")
    return BenchRecord(
        bundle=run.bundle, format=run.format, model=run.model, profile=run.profile, profile_source=run.profile_source,
        host_id=host.host_id, load_s=round(child["load_s"], 3),
        ttft_ms=ttft[0], ttft_ms_stddev=ttft[1], ttft_ms_min=ttft[2], ttft_ms_max=ttft[3],
        prefill_tok_s=prefill[0], prefill_tok_s_stddev=prefill[1], prefill_tok_s_min=prefill[2], prefill_tok_s_max=prefill[3],
        decode_tok_s=decode[0], decode_tok_s_stddev=decode[1], decode_tok_s_min=decode[2], decode_tok_s_max=decode[3],
        peak_rss_mb=peak, rss_before_load_mb=round(child["rss_before_load_mb"], 1),
        rss_after_load_mb=round(child["rss_after_load_mb"], 1), rss_after_prefill_mb=round(child["rss_after_prefill_mb"], 1),
        rss_end_mb=round(child["rss_end_mb"], 1), model_bytes=run.model_bytes, bundle_bytes=run.bundle_bytes,
        kv_bytes_per_token=run.kv_bytes_per_token, bytes_per_token=bytes_per_token, read_bandwidth_gbs=bandwidth_gbs,
        bandwidth_utilization=utilization, threads=run.threads, gpu_layers=child["gpu_layers"], context=run.context,
        accuracy_level=run.accuracy_level, prompt_tokens=run.prompt_tokens, gen_tokens=run.gen_tokens, reps=run.reps,
        warmup=run.warmup, passed=not failures, budget_failures=tuple(failures),
        substitutions=run.substitutions + tuple(child.get("substitutions", ())), notes=run.notes,
        host=host.to_dict(), runtime=dict(child.get("runtime", {})), trials=trials,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        kv_cache_mb=kv_mb, kv_share_of_peak=round(kv_mb / peak, 3) if peak else 0.0,
    )


def record_in_manifest(record: BenchRecord) -> None:
    """manifest["bench"][profile][host_id] = the latest record; the file list is untouched,
    so the bundle still validates."""
    from .bundle import read_manifest, update_manifest

    bench = dict(read_manifest(Path(record.bundle)).get("bench") or {})
    per_profile = dict(bench.get(record.profile) or {})
    per_profile[record.host_id] = record.to_dict()
    bench[record.profile] = per_profile
    update_manifest(Path(record.bundle), bench=bench)


def _check_output(output: str | Path | None) -> Path | None:
    if output is None:
        return None
    out = Path(output)
    if out.is_dir():
        raise BadInput(f"--output {out} is a directory", "Pass a file name, e.g. results.jsonl")
    if not out.parent.is_dir():
        raise BadInput(f"--output {out}: directory {out.parent} does not exist", "Create it or choose another path")
    return out


def bench(bundles: Sequence[str | Path] = (), *, profile: str | None = None, reps: int = DEFAULT_REPS,
          warmup: int = DEFAULT_WARMUP, prompt_tokens: int | None = None, gen_tokens: int | None = None,
          overrides: dict[str, Any] | None = None, output: str | Path | None = None,
          write_manifest: bool = True, progress=None) -> list[BenchRecord]:
    """See edgekit.api.bench."""
    from . import host as hostmod
    from .progress import NullProgress

    progress = progress or NullProgress()
    if reps < 1:
        raise BadInput(f"--reps must be at least 1, got {reps}", "Pass a positive number of timed repetitions")
    if warmup < 0:
        raise BadInput(f"--warmup must be 0 or more, got {warmup}", "Pass 0 to skip the warm-up")
    out = _check_output(output)
    host = hostmod.facts()
    prof, source, why = choose_profile(profile, overrides, host)
    skipped: list[str] = []
    runs = plan(bundles, prof, source, host, reps=reps, warmup=warmup, prompt_tokens=prompt_tokens,
                gen_tokens=gen_tokens, notes=skipped)
    # Said only once every input is known good: a bad input gets exactly one line.
    if source == "detected":
        progress.note(f"profile: {prof.name} ({why}; pass --profile to choose)")
    for line in skipped:
        progress.note(line)
    bandwidth = hostmod.read_bandwidth_gbs(host, progress=progress)
    records = []
    for run in runs:
        for s in run.substitutions:
            progress.note(f"{run.bundle}: {s}")
        with progress.step(f"bench {Path(run.bundle).name}", total=1 + run.warmup + run.reps) as step:
            child, _ = run_child(run, on_mark=lambda mark: step.advance())
        record = make_record(run, child, host, bandwidth)
        for s in child.get("substitutions", ()):
            progress.note(f"{run.bundle}: {s}")
        if write_manifest:
            record_in_manifest(record)
        if out is not None:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")
        records.append(record)
    return records


def gate(records: Iterable[BenchRecord]) -> None:
    failed = [f"{r.bundle} on {r.profile}: {'; '.join(r.budget_failures)}" for r in records if not r.passed]
    if failed:
        raise GateFailed("bench budget exceeded: " + " | ".join(failed), "See the bench section of the bundle's manifest.json")


def print_table(records: Sequence[BenchRecord]) -> None:
    """A human table on stderr: medians, with the spread as a relative standard deviation."""
    from rich.console import Console
    from rich.table import Table

    if not records:
        return
    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)
    r0 = records[0]

    def spread(median: float, sd: float, fmt: str) -> str:
        return f"{median:{fmt}} ±{sd / median:.0%}" if median else f"{median:{fmt}}"

    budgets = any(r.budget_failures or r.profile == "mobile-onnx" for r in records)
    table = Table(title=f"edgekit bench, profile {r0.profile}, host {r0.host_id} ({r0.host['cpu']})",
                  title_justify="left")
    cols = ["bundle", "load s", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MB", "KV cache MB", "BW util"]
    for col in cols + (["budget"] if budgets else []):
        table.add_column(col, justify="left" if col in ("bundle", "budget") else "right")
    for r in records:
        row = [Path(r.bundle).name, f"{r.load_s:.2f}", spread(r.ttft_ms, r.ttft_ms_stddev, ".1f"),
               spread(r.prefill_tok_s, r.prefill_tok_s_stddev, ".0f"), spread(r.decode_tok_s, r.decode_tok_s_stddev, ".1f"),
               f"{r.peak_rss_mb:.0f}", f"{r.kv_cache_mb:.0f} ({r.kv_share_of_peak:.0%})", f"{r.bandwidth_utilization:.0%}"]
        if budgets:
            row.append("ok" if r.passed else "FAIL: " + "; ".join(r.budget_failures))
        table.add_row(*row)
    console.print(table)
    console.print(f"{r0.prompt_tokens} prompt tokens, {r0.gen_tokens} generated, context {r0.context} (the KV cache "
                  f"is allocated for all of it), {r0.threads} threads; median of "
                  f"{r0.reps} after {r0.warmup} warm-up (± relative stddev); read bandwidth "
                  f"{r0.read_bandwidth_gbs:.1f} GB/s", markup=False)


# --------------------------------------------------------------------------------------------
# the child: `python -m edgekit.bench JOB RESULT`
# --------------------------------------------------------------------------------------------

def prompt_ids(encode: Callable[[str], list[int]], n: int) -> list[int]:
    """n tokens of edgekit's eval text in the runtime's own tokenization, repeated as needed."""
    from .reference import default_eval_text

    ids = list(encode(default_eval_text()))
    if not ids:
        raise ToolFailed("the runtime's tokenizer returned no tokens for the eval text")
    return (ids * math.ceil(n / len(ids)))[:n]


def run_trials(timed_generate: Callable[..., tuple[float, float, float, int]], prompt: Sequence[int],
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
        trial = Trial(*timed_generate(prompt, gen_tokens, probe if i == reps - 1 else None))
        if trial.n_generated != gen_tokens:
            raise ToolFailed(f"a trial generated {trial.n_generated} tokens instead of {gen_tokens}")
        trials.append(trial)
        if on_trial:
            on_trial(f"rep {i + 1}/{reps}")
    return trials


def _mark(text: str) -> None:
    from .childjob import emit_mark

    emit_mark(CHILD_MARK, text)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def open_run(run: Run) -> tuple[Any, Callable[..., tuple[float, float, float, int]], dict[str, Any]]:
    """Import the runtime (outside the load timing), then open the bundle in it, timed."""
    import platform

    info: dict[str, Any] = {"substitutions": [], "gpu_layers": run.gpu_layers}
    bundle = Path(run.bundle)
    if run.format == "gguf-q4_k_m":
        import llama_cpp

        from .formats.gguf_q4km.recipe import MODEL_FILE
        from .formats.gguf_q4km.session import LlamaCppSession, longrope_context_note

        info["runtime"] = {"llama-cpp-python": llama_cpp.__version__}
        if run.gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            layers = "all layers" if run.gpu_layers < 0 else f"{run.gpu_layers} layers"
            info["substitutions"].append(
                f"gpu_layers: the profile offloads {layers} to the GPU (Metal on Apple silicon); this llama.cpp "
                f"has no GPU offload on {platform.system()} {platform.machine()}, so every layer ran on the CPU")
            info["gpu_layers"] = 0
        if note := longrope_context_note(bundle / MODEL_FILE, run.context):
            info["substitutions"].append(note)
        info["rss_before_load_mb"] = _rss()
        t0 = time.perf_counter()
        session = LlamaCppSession.open_offloaded(bundle / MODEL_FILE, run.threads, run.context,
                                                 info["gpu_layers"])
        info["load_s"] = time.perf_counter() - t0
        return session, session.timed_generate, info
    import onnxruntime_genai as og

    from .bundle import read_manifest
    from .formats import onnx_int4

    info["runtime"] = {"onnxruntime-genai": og.__version__, "onnxruntime": _package_version("onnxruntime")}
    manifest = read_manifest(bundle)  # validated by the parent
    info["rss_before_load_mb"] = _rss()
    t0 = time.perf_counter()
    session = onnx_int4.open_session(bundle, manifest, threads=run.threads)
    info["load_s"] = time.perf_counter() - t0

    def timed(prompt, gen_tokens, probe=None):
        return session.timed_generate(prompt, gen_tokens, probe, max_length=run.context)

    return session, timed, info


def _rss() -> float:
    from .host import rss_mb

    return rss_mb()


def child_run(run: Run) -> dict[str, Any]:
    from .host import peak_rss_mb

    session, timed_generate, info = open_run(run)
    _mark("load")
    rss = {"load": _rss()}
    try:
        prompt = prompt_ids(session.encode, run.prompt_tokens)  # tokenization: outside every timed region
        trials = run_trials(timed_generate, prompt, run.gen_tokens, run.reps, run.warmup,
                            probe=lambda stage: rss.__setitem__(stage, _rss()), on_trial=_mark)
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
    return Run(**{k: tuple(v) if isinstance(v, list) else v for k, v in job.items() if k in fields})


def child_main(argv: Sequence[str]) -> int:
    from . import childjob

    return childjob.main(argv, lambda job: child_run(run_from_job(job)), lambda job: job.get("bundle", "?"))


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
