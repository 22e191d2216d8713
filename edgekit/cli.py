"""The `edgekit` command: a thin Click client of edgekit.api. No logic lives here.

Human text and progress go to stderr; `--json` prints exactly one JSON document on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__

EXIT_CODES_HELP = "Exit codes: 0 ok, 1 unexpected error, 2 bad input, 3 quality gate failed, 4 integrity check failed, 130 interrupted."


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def _err(text: str) -> None:
    click.echo(text, err=True)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)


def model_options(f):
    """Options shared by every command that reads a checkpoint."""
    f = click.option("--revision", help="Hub revision (branch, tag or commit) for a hub id.")(f)
    f = click.option("--offline", is_flag=True, default=None, help="Never contact the hub; fail fast if the model is not cached.")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="Allow Python code shipped with the model repo to run (off by default).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow pickle weights (*.bin, *.pt); they can run code when loaded.")(f)
    return f


def threshold_options(f):
    f = click.option("--max-kld", type=float, help="Override kld_mean_max from targets/<format>.toml.")(f)
    f = click.option("--min-top1", type=float, help="Override top1_agreement_min.")(f)
    f = click.option("--max-ppl-ratio", type=float, help="Override ppl_ratio_max.")(f)
    return f


def long_context_option(f):
    return click.option(
        "--long-context/--no-long-context", "long_context", default=None,
        help="Probe parity past the original context (a prompt below it, then token by token across it). "
             "Default: on for checkpoints whose RoPE changes there (LongRoPE, Llama 3 scaling, YaRN).")(f)


def _threshold_overrides(max_kld, min_top1, max_ppl_ratio) -> dict[str, Any]:
    return {"kld_mean_max": max_kld, "top1_agreement_min": min_top1, "ppl_ratio_max": max_ppl_ratio}



def _progress(quiet: bool):
    from .progress import RichProgress

    return RichProgress(quiet=quiet)


class _Failure(click.ClickException):
    """An error already phrased for the user: one line on stderr, its own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class EdgekitGroup(click.Group):
    """Maps library errors to one line and an exit code; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug")) or os.environ.get("EDGEKIT_DEBUG") == "1"
        from .errors import EdgekitError

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except EdgekitError as e:
            if debug:
                raise
            raise _Failure(e.one_line(), e.exit_code) from None
        except KeyboardInterrupt:
            raise _Failure("interrupted; nothing was written", 130) from None
        except OSError as e:
            import errno

            if debug:
                raise
            if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise _Failure(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1) from None
            raise _Failure(f"disk full while writing {e.filename or 'the output'} ({e.strerror}); nothing was published. "
                           "Free space or choose another --out", 1) from None
        except Exception as e:  # noqa: BLE001
            if debug:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            raise _Failure(f"unexpected {type(e).__name__}: {first} (rerun with --debug for the traceback)", 1) from None


@click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "--version", prog_name="edgekit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--targets-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Your own target files on top of the shipped ones: a DIR/<name>.toml replaces the shipped file "
                   "of that name, a new one adds a format (also $EDGEKIT_TARGETS_DIR).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, targets_dir: str | None) -> None:
    """Export, verify and benchmark small language models for on-device runtimes.

    \b
    Example:
        edgekit export smollm2-135m --target all
        edgekit run dist/smollm2-135m-gguf-q4_k_m --prompt "What is the capital of France?"
    """
    ctx.obj = {"debug": debug}
    if targets_dir:
        from .targets import USER_DIR_ENV

        # An environment variable, not a parameter: build and bench children read it too.
        os.environ[USER_DIR_ENV] = str(Path(targets_dir).resolve())


@cli.command()
@json_option
def targets(as_json: bool) -> None:
    """List export formats and device profiles (the shipped target files, and --targets-dir's).

    \b
    Example:
        edgekit targets --json
    """
    from .targets import load_targets

    t = load_targets()
    doc = {
        "formats": {n: {"description": s.description, "runtime": s.runtime, "recipe": s.recipe, "source": s.source}
                    for n, s in sorted(t.formats.items())},
        "profiles": {n: {k: v for k, v in vars(p).items() if k != "name"} for n, p in sorted(t.profiles.items())},
    }
    if as_json:
        _emit_json(doc)
        return
    _err("formats:")
    for n, s in sorted(t.formats.items()):
        recipe = ", ".join(f"{k}={v}" for k, v in s.recipe.items())
        _err(f"  {n:<14} {s.description} ({s.runtime})\n  {'':<14} recipe: {recipe}")
    _err("profiles:")
    for n, p in sorted(t.profiles.items()):
        _err(f"  {n:<14} {p.description}; formats: {', '.join(p.formats)}; threads: {p.threads}")


@cli.command()
@click.argument("model")
@click.option("--target", "-t", default="onnx-int4", show_default=True,
              help="onnx-int4, gguf-q4_k_m, or all.")
@click.option("--out", "-o", type=click.Path(), help="Bundle directory (with --target all: parent directory). Default: dist/<model>-<target>.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty --out, and export even if the resource preflight says RAM or disk is short.")
@click.option("--set", "recipe_set", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key from targets/<target>.toml, e.g. --set block_size=64.")
@click.option("--tune", is_flag=True,
              help="Try the [[tune]] candidates of targets/<target>.toml; keep the smallest that passes the gate.")
@click.option("--verify/--no-verify", "run_verify", default=True, show_default=True,
              help="Check parity against the unquantized reference after exporting (exit 3 on a failed gate).")
@click.option("--eval-text", type=click.Path(), help="Text for the parity check (default: built-in).")
@long_context_option
@threshold_options
@model_options
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def export(model, target, out, force, recipe_set, tune, run_verify, eval_text, long_context, max_kld, min_top1,
           max_ppl_ratio, revision, offline, trust_remote_code, allow_pickle, as_json, quiet):
    """Export MODEL (checkpoint dir, hub id or alias) to a deployable bundle.

    \b
    Example:
        edgekit export phi3-mini --target onnx-int4
        edgekit export ./my-checkpoint --target gguf-q4_k_m --out dist/my-q4
        edgekit export smollm2-135m --target all --no-verify
        edgekit export smollm2-135m --target onnx-int4 --tune
    """
    from . import api

    if eval_text and not run_verify:
        from .errors import BadInput

        raise BadInput("--eval-text has no effect with --no-verify", "Drop one of them")
    if long_context and not run_verify:
        from .errors import BadInput

        raise BadInput("--long-context has no effect with --no-verify", "Drop one of them")
    progress = _progress(quiet or as_json)
    if tune and not run_verify:
        from .errors import BadInput

        raise BadInput("--tune chooses by parity, so it cannot run with --no-verify", "Drop --no-verify")
    results = api.export(model, target, out, force=force, revision=revision, offline=offline,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                         recipe=_parse_sets(recipe_set), tune=tune, eval_text=eval_text, long_context=long_context,
                         thresholds=_threshold_overrides(max_kld, min_top1, max_ppl_ratio), progress=progress)
    if tune:
        run_verify = False  # every kept bundle was verified while tuning; its parity.json is inside
    reports = []
    for r in results:
        _err(f"wrote {r.bundle}  ({r.format}, {r.size_bytes / 2**20:.1f} MiB, {r.files} files, "
             f"{r.wall_s:.1f} s, peak RSS {r.peak_rss_mb:.0f} MiB, via {r.path_taken})")
        if run_verify:
            reports.append(api.verify(r.bundle, eval_text=eval_text, offline=offline, trust_remote_code=trust_remote_code,
                                      long_context=long_context, thresholds=_threshold_overrides(max_kld, min_top1, max_ppl_ratio), progress=progress))
            if not as_json:
                _print_parity(reports[-1])
    if as_json:
        _emit_json({"bundles": [r.to_dict() for r in results], "parity": [p.to_dict() for p in reports]})
    _gate(reports)


def _print_parity(report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"parity: {report.bundle} ({report.format})", title_justify="left")
    for col in ("metric", "value", "gate", "ok"):
        table.add_column(col)
    gates = {c.name: c for c in report.checks}
    rows = [("kld_mean", report.kld_mean), ("kld_p99", report.kld_p99), ("top1_agreement", report.top1_agreement),
            ("ppl_ref", report.ppl_ref), ("ppl_bundle", report.ppl_bundle), ("ppl_ratio", report.ppl_ratio),
            ("delta_p_mean", report.delta_p_mean), ("greedy_match_tokens_mean", report.greedy_match_tokens_mean),
            ("tokenizer_agreement", report.tokenizer_agreement), ("chat_template_match", report.chat_template_match)]
    for name, value in rows:
        c = gates.get(name)
        shown = str(value) if isinstance(value, bool) else f"{value:.4f}"
        table.add_row(name, shown, f"{c.op} {c.threshold}" if c else "", ("✓" if c.passed else "✗ FAIL") if c else "")
    console = Console(stderr=True)
    console.print(table)
    ref = report.reference
    console.print(f"{report.positions} positions, reference {ref['dtype']} ({'cached' if ref['cached'] else 'computed'}), "
                  f"{report.wall_s:.1f} s, peak RSS {report.peak_rss_mb:.0f} MiB", highlight=False)
    for failure in report.tokenizer_failures[:5]:
        console.print(f"  tokenizer: {failure}", markup=False, highlight=False)
    lc = report.long_context
    if lc is not None:
        after = (f"past it KLD {lc.kld_mean_after:.3g}, top-1 {lc.top1_after:.3f}" if lc.kld_mean_after is not None
                 else "no position past it (the bundle's context ends first)")
        console.print(f"long context: {lc.positions} positions across token {lc.boundary} (prompt {lc.prompt_tokens}, "
                      f"then one at a time): {after}; before it KLD {lc.kld_mean_before:.3g}; parity holds to "
                      f"{lc.parity_context} tokens {'✓' if lc.passed else '✗ FAIL'}", markup=False, highlight=False)
        if lc.limit:
            console.print(f"  {lc.limit}", markup=False, highlight=False)


def _gate(reports) -> None:
    from .errors import GateFailed

    failed = [f"{r.bundle}: {'; '.join(r.failed)}" for r in reports if not r.passed]
    if failed:
        raise GateFailed("parity gate failed: " + " | ".join(failed), "See parity.json in the bundle")


@cli.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path())
@click.option("--eval-text", type=click.Path(), help="UTF-8 text to evaluate on (default: edgekit's built-in mix).")
@click.option("--reference", help="The unquantized checkpoint (default: the one recorded in the manifest).")
@click.option("--window", type=int, help="Tokens per evaluation window (default 512).")
@long_context_option
@threshold_options
@click.option("--offline", is_flag=True, default=None, help="Never contact the hub for the reference.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the reference checkpoint's own Python code to run.")
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def verify(bundles, eval_text, reference, window, long_context, max_kld, min_top1, max_ppl_ratio, offline, trust_remote_code, as_json, quiet):
    """Check BUNDLES against the unquantized reference; exit 3 if a threshold fails.

    Reports KL divergence, top-1 agreement, perplexity ratio, greedy continuation,
    tokenizer and chat-template agreement, and writes parity.json into each bundle.

    \b
    Example:
        edgekit verify dist/phi3-mini-onnx-int4
        edgekit verify dist/x --eval-text my_domain.txt --json
    """
    from . import api

    progress = _progress(quiet or as_json)
    reports = [api.verify(b, eval_text=eval_text, reference=reference, window=window, offline=offline,
                          trust_remote_code=trust_remote_code, progress=progress, long_context=long_context,
                          thresholds=_threshold_overrides(max_kld, min_top1, max_ppl_ratio)) for b in bundles]
    if as_json:
        _emit_json({"reports": [r.to_dict() for r in reports]})
    else:
        for r in reports:
            _print_parity(r)
    _gate(reports)


def _parse_sets(items) -> dict[str, Any]:
    from .errors import BadInput

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise BadInput(f"--set '{item}' is not KEY=VALUE", "Write e.g. --set block_size=64")
        key, value = item.split("=", 1)
        out[key.strip()] = _coerce(value.strip())
    return out


def _coerce(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--prompt", "-p", required=True, help="The user message (or raw text with --raw).")
@click.option("--max-tokens", default=128, show_default=True, type=int, help="Maximum tokens to generate.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--system", help="A system message for the chat template.")
@click.option("--threads", type=int, help="Runtime threads (default: the runtime's choice).")
@json_option
def run(bundle, prompt, max_tokens, raw, system, threads, as_json):
    """Generate from BUNDLE with its own runtime, streaming tokens to stdout.

    The bundle is validated (hashes, files) before it is loaded.

    \b
    Example:
        edgekit run dist/my-q4 --prompt "What is the capital of France?"
    """
    from . import api

    def stream(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    result = api.run(bundle, prompt, max_tokens=max_tokens, raw=raw, system=system, threads=threads,
                     on_text=None if as_json else stream)
    if as_json:
        _emit_json(result.to_dict())
        return
    click.echo()
    _err(f"[{result.format}: {result.prompt_tokens} prompt tokens, {result.generated_tokens} generated, "
         f"TTFT {result.ttft_ms:.0f} ms, {result.decode_tok_s:.1f} tok/s, stopped by {result.stopped_by}]")


@cli.command()
@click.argument("bundles", nargs=-1, type=click.Path())
@click.option("--profile", "-p", help="Device profile from targets/profiles.toml (default: detected from this host).")
@click.option("--reps", default=5, show_default=True, type=int, help="Timed repetitions after the warm-up.")
@click.option("--warmup", default=1, show_default=True, type=int, help="Untimed warm-up generations.")
@click.option("--prompt-tokens", type=int, help="Prompt length in tokens (default: the profile's).")
@click.option("--gen-tokens", type=int, help="Tokens generated per repetition, EOS ignored (default: the profile's).")
@click.option("--set", "profile_set", multiple=True, metavar="KEY=VALUE",
              help="Override a profile key, e.g. --set max_peak_rss_mb=512 or --set threads=1.")
@click.option("--output", "-o", type=click.Path(), help="Append one JSON line per record to this file.")
@click.option("--no-manifest", is_flag=True, help="Do not write the results into the bundles' manifest.json.")
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def bench(bundles, profile, reps, warmup, prompt_tokens, gen_tokens, profile_set, output, no_manifest, as_json, quiet):
    """Measure prefill and decode tokens/sec, time to first token and peak RSS of BUNDLES
    (default: every bundle in dist/) on a device profile; exit 3 if a profile budget is exceeded.

    Each bundle runs in a fresh process: load, one warm-up, then --reps timed greedy
    generations of a fixed length. The latest results per profile and host go into each
    bundle's manifest.json.

    \b
    Example:
        edgekit bench
        edgekit bench dist/phi3-mini-onnx-int4 --profile mobile-onnx --json
        edgekit bench dist/a dist/b --profile laptop-cpu --reps 10 --prompt-tokens 512 --gen-tokens 128
    """
    from . import api
    from .bench import gate, print_table

    records = api.bench(bundles, profile=profile, reps=reps, warmup=warmup, prompt_tokens=prompt_tokens,
                        gen_tokens=gen_tokens, overrides=_parse_sets(profile_set), output=output,
                        write_manifest=not no_manifest, progress=_progress(quiet or as_json))
    if as_json:
        _emit_json([r.to_dict() for r in records])
    elif not quiet:
        print_table(records)
    gate(records)


def eval_options(f):
    """Options shared by eval and select: which items, on which profile, against what."""
    f = click.option("--tasks", "-t", type=click.Path(), help="JSONL task file (default: the shipped edgekit-basic set).")(f)
    f = click.option("--limit", type=int, help="Only the first N items of the task file.")(f)
    f = click.option("--profile", "-p", help="Device profile from targets/profiles.toml (default: detected from this host).")(f)
    f = click.option("--no-reference", is_flag=True, help="Skip the unquantized reference row (no deltas, flips or drop).")(f)
    f = click.option("--reference", "reference_ckpt", help="The unquantized checkpoint (default: the one in each manifest).")(f)
    f = click.option("--case-sensitive", is_flag=True, help="exact/contains: do not fold case.")(f)
    f = click.option("--keep-whitespace", is_flag=True, help="exact/contains: do not collapse whitespace.")(f)
    f = click.option("--keep-punctuation", is_flag=True, help="exact/contains: do not strip leading/trailing punctuation.")(f)
    f = click.option("--max-paraphrase-drop", type=float, default=0.10, show_default=True,
                     help="Robustness threshold for paraphrase drop.")(f)
    f = click.option("--max-format-sensitivity", type=float, default=0.05, show_default=True,
                     help="Robustness threshold for format sensitivity.")(f)
    f = click.option("--offline", is_flag=True, default=None, help="Never contact the hub for the reference.")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="Allow the reference checkpoint's own Python code to run.")(f)
    return f


def _eval_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    norm = {"case": False if kw.pop("case_sensitive") else None,
            "whitespace": False if kw.pop("keep_whitespace") else None,
            "punctuation": False if kw.pop("keep_punctuation") else None}
    no_ref, ckpt = kw.pop("no_reference"), kw.pop("reference_ckpt")
    if no_ref and ckpt:
        from .errors import BadInput

        raise BadInput("--reference and --no-reference contradict each other", "Drop one of them")
    return {**kw, "normalization": norm, "reference": False if no_ref else (ckpt or True)}


def select_options(f):
    f = click.option("--min-accuracy", type=float, help="Lowest acceptable accuracy (0-1).")(f)
    f = click.option("--max-accuracy-drop", type=float, help="Largest acceptable drop against the reference (0-1).")(f)
    f = click.option("--max-p95-ms", type=float, help="Largest acceptable p95 end-to-end latency per request, ms.")(f)
    f = click.option("--max-rss-mb", type=float, help="Largest acceptable peak RSS, MiB.")(f)
    f = click.option("--max-size-mb", type=float, help="Largest acceptable bundle size, MiB.")(f)
    return f


_CONSTRAINTS = ("min_accuracy", "max_accuracy_drop", "max_p95_ms", "max_rss_mb", "max_size_mb")


@cli.command("eval")
@click.argument("bundles", nargs=-1, type=click.Path())
@eval_options
@click.option("--output", "-o", type=click.Path(), help="Write one JSON line per item per bundle (replaced).")
@click.option("--no-manifest", is_flag=True, help="Do not write the summary into the bundles' manifest.json.")
@click.option("--pick", is_flag=True, help="Also select a bundle (see `edgekit select`); exit 3 if none is feasible.")
@select_options
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress or warnings on stderr.")
def eval_(bundles, output, no_manifest, pick, as_json, quiet, **kw):
    """Run a task file on BUNDLES (default: every bundle in dist/) and on the unquantized
    reference: accuracy with a 95 % interval, flips and McNemar p against the reference,
    calibration, robustness across paraphrases and formats, p50/p95 latency, peak RSS, size.

    Each bundle runs in a fresh process with the same items, order and settings; chat items
    go through each bundle's own chat template and tokenizer. Task format: edgekit/tasks.py.

    \b
    Example:
        edgekit eval dist/*/ --profile laptop-cpu
        edgekit eval dist/a dist/b --tasks my-tasks.jsonl --limit 50 --output items.jsonl --json
        edgekit eval dist/*/ --tasks my-tasks.jsonl --pick --min-accuracy 0.8 --max-p95-ms 1500
    """
    from . import api
    from .evaluate import print_table

    limits = {k: kw.pop(k) for k in _CONSTRAINTS}
    if any(v is not None for v in limits.values()) and not pick:
        from .errors import BadInput

        raise BadInput("constraints (--min-accuracy, --max-p95-ms, ...) need --pick", "Add --pick, or use edgekit select")
    report = api.evaluate(bundles, output=output, write_manifest=not no_manifest,
                          progress=_progress(quiet or as_json), **_eval_kwargs(kw))
    if not quiet and not as_json:
        print_table(report)
    elif not quiet:
        for w in report.warnings:
            _err(f"warning: {w}")
    doc = report.to_dict()
    if pick:
        _select_and_print(lambda: api.select(list(report.bundles), **limits), doc, as_json, quiet)
    elif as_json:
        _emit_json(doc)


def _select_and_print(run, doc: dict[str, Any] | None, as_json: bool, quiet: bool) -> None:
    from .select import NoFeasibleBundle, print_selection

    error = None
    try:
        selection = run()
    except NoFeasibleBundle as e:
        error, selection = e, e.selection
    if as_json:
        _emit_json({**(doc or {}), "selection": selection.to_dict()})
    elif not quiet:
        print_selection(selection)
    if error is not None:
        raise error
    if not as_json:
        _err(f"pick: {selection.pick}")


@cli.command("select")
@click.argument("bundles", nargs=-1, type=click.Path())
@select_options
@click.option("--from", "from_json", type=click.Path(), help="Use an `edgekit eval --json` document instead of evaluating.")
@click.option("--stored", is_flag=True, help="Use the eval results stored in the bundles' manifests for --tasks.")
@eval_options
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def select_(bundles, from_json, stored, as_json, quiet, **kw):
    """Pick the bundle to ship: the Pareto set over accuracy, p95 latency, peak RSS and size,
    the most accurate bundle meeting every constraint (ties: lower RSS, then smaller), and why
    each other bundle lost. Exit 3 naming the nearest miss when none is feasible.

    Evaluates BUNDLES first (as `edgekit eval`), unless --from or --stored says where results are.

    \b
    Example:
        edgekit select dist/*/ --tasks my-tasks.jsonl --min-accuracy 0.8 --max-p95-ms 1500 --max-rss-mb 3000
        edgekit eval dist/*/ --json > eval.json && edgekit select --from eval.json --max-accuracy-drop 0.02
    """
    from . import api
    from .errors import BadInput

    limits = {k: kw.pop(k) for k in _CONSTRAINTS}
    if from_json and (bundles or stored):
        raise BadInput("--from takes the bundles from the eval document", "Drop the bundle arguments or --stored")
    ekw = _eval_kwargs(kw)
    if from_json or stored:
        extra = {}
    else:
        extra = {k: v for k, v in ekw.items() if k not in ("tasks", "limit")}
        extra["progress"] = _progress(quiet or as_json)
    _select_and_print(lambda: api.select(bundles=bundles, from_json=from_json, stored=stored, tasks=ekw["tasks"],
                                         limit=ekw["limit"], **limits, **extra), None, as_json, quiet)


@cli.command()
@click.option("--config", "-c", type=click.Path(), help="Build config (default: ./edgekit.toml).")
@click.option("--out", "-o", type=click.Path(), help="Output directory (default: [build] out, else dist/).")
@click.option("--force", is_flag=True, help="Rebuild every entry even if its inputs are unchanged.")
@click.option("--baseline", type=click.Path(), help="A previous build's output directory: fail on regressions beyond the config's margins.")
@click.option("--shard", metavar="K/N", help="Build only the K-th of N deterministic slices of the matrix.")
@click.option("--merge", "merge_dirs", multiple=True, type=click.Path(), metavar="DIR",
              help="Combine shard outputs (repeat --merge DIR) into --out instead of building.")
@click.option("--offline", is_flag=True, default=None, help="Never contact the hub.")
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def build(config, out, force, baseline, shard, merge_dirs, offline, as_json, quiet):
    """Build a matrix of verified, benchmarked bundles from an edgekit.toml; exit with the
    worst outcome (3 when a gate or a --baseline regression failed).

    Writes each bundle, its <name>.tar.gz, SHA256SUMS, summary.json, summary.md and
    report.html into the output directory. Entries whose inputs are unchanged are reused.

    \b
    Example:
        edgekit build
        edgekit build --config release.toml --out dist/ --baseline previous-release/ --json
        edgekit build --shard 1/2 --out shard1/   # in one CI job; --shard 2/2 in another
        edgekit build --merge shard1/ --merge shard2/ --out dist/
    """
    from . import build as _build
    from .errors import BadInput

    if merge_dirs and (shard or force or config):
        raise BadInput("--merge combines finished shards; it takes no --shard, --force or --config", "Drop them")
    if merge_dirs and not out:
        raise BadInput("--merge needs --out DIR for the combined output", "Add --out")
    progress = _progress(quiet)  # a matrix runs for long: progress on stderr even with --json
    error = None
    try:
        if merge_dirs:
            summary = _build.merge(list(merge_dirs), out, baseline=baseline, progress=progress)
        else:
            summary = _build.build(config, out=out, force=force, baseline=baseline, shard=shard, offline=offline,
                                   progress=progress)
    except _build.BuildFailed as e:  # outputs are written; show them, then exit with the worst code
        error, summary = e, e.summary
    if as_json:
        _emit_json(summary)
    elif not quiet:
        _err(_build.render_markdown(summary))
    if error is not None:
        raise error


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@json_option
def validate(paths, as_json):
    """Check bundle directories or tarballs against their manifests; exit 4 naming the first bad file.

    Checks the manifest schema, every file's size and sha256, and that no file is missing or
    extra. Tarballs are checked member by member (no absolute paths, `..`, links or devices)
    before anything is extracted.

    \b
    Example:
        edgekit validate dist/phi3-mini-gguf-q4_k_m.tar.gz
        edgekit validate dist/phi3-mini-onnx-int4
    """
    from . import api

    results = []
    for p in paths:
        m = api.validate(p)
        results.append({"path": p, "format": m["format"], "files": len(m["files"]),
                        "size_bytes": sum(f["size"] for f in m["files"]), "valid": True})
        if not as_json:
            _err(f"ok: {p} ({m['format']}, {len(m['files'])} files, sha256 and sizes match the manifest)")
    if as_json:
        _emit_json(results)


@cli.command()
@click.argument("directory", type=click.Path())
@click.option("--out", "-o", type=click.Path(), help="HTML file to write (default: DIRECTORY/report.html).")
def report(directory, out):
    """Write a self-contained HTML report (summary table, quality/speed/size trade-off with the
    Pareto front, peak RSS against budgets) from a build's summary.json.

    \b
    Example:
        edgekit report dist/ --out report.html
    """
    from .report import write_report

    path = write_report(directory, out)
    _err(f"wrote {path}")


def _on_sigterm(signum, frame):
    # Turn SIGTERM into an exception so staging directories are removed on the way out.
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    cli(prog_name="edgekit")
