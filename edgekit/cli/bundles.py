"""Commands on one model or bundle: targets, export, verify, run, bench, validate."""

from __future__ import annotations

import sys

import click

from .. import api
from ..bench import gate as bench_gate
from ..bench import print_table as print_bench_table
from ..bundle import bundle_size
from ..formats import REGISTRY, default_format
from ..overrides import parse_sets
from ..targets import load_targets
from ..verification import print_parity
from .group import (
    cli,
    emit_json,
    err,
    json_option,
    long_context_option,
    model_options,
    progress_for,
    threshold_options,
    threshold_overrides,
)


@cli.command()
@json_option
def targets(as_json: bool) -> None:
    """List export formats and device profiles (the shipped target files, and --targets-dir's).

    \b
    Example:
        edgekit targets --json
    """
    t = load_targets()
    doc = {
        "formats": {
            n: {"description": s.description, "runtime": s.runtime, "recipe": s.recipe, "source": s.source}
            for n, s in sorted(t.formats.items())
        },
        "profiles": {n: {k: v for k, v in vars(p).items() if k != "name"} for n, p in sorted(t.profiles.items())},
    }
    if as_json:
        emit_json(doc)
        return
    err("formats:")
    for n, s in sorted(t.formats.items()):
        recipe = ", ".join(f"{k}={v}" for k, v in s.recipe.items())
        err(f"  {n:<14} {s.description} ({s.runtime})\n  {'':<14} recipe: {recipe}")
    err("profiles:")
    for n, p in sorted(t.profiles.items()):
        err(f"  {n:<14} {p.description}; formats: {', '.join(p.formats)}; threads: {p.threads}")


@cli.command()
@click.argument("model")
@click.option("--target", "-t", default=default_format(), show_default=True, help=f"{', '.join(REGISTRY)}, or all.")
@click.option(
    "--out",
    "-o",
    type=click.Path(),
    help="Bundle directory (with --target all: parent directory). Default: dist/<model>-<target>.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing non-empty --out, and export even if the resource preflight says RAM or disk is short.",
)
@click.option(
    "--set",
    "recipe_set",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key from targets/<target>.toml, e.g. --set block_size=64.",
)
@click.option(
    "--tune",
    is_flag=True,
    help="Try the [[tune]] candidates of targets/<target>.toml; keep the smallest that passes the gate.",
)
@click.option(
    "--verify/--no-verify",
    "run_verify",
    default=True,
    show_default=True,
    help="Check parity against the unquantized reference after exporting (exit 3 on a failed gate).",
)
@click.option("--eval-text", type=click.Path(), help="Text for the parity check (default: built-in).")
@long_context_option
@threshold_options
@model_options
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def export(
    model: str,
    target: str,
    out: str | None,
    force: bool,
    recipe_set: tuple[str, ...],
    tune: bool,
    run_verify: bool,
    eval_text: str | None,
    long_context: bool | None,
    max_kld: float | None,
    min_top1: float | None,
    max_ppl_ratio: float | None,
    revision: str | None,
    offline: bool | None,
    trust_remote_code: bool,
    allow_pickle: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Export MODEL (checkpoint dir, hub id or alias) to a deployable bundle.

    \b
    Example:
        edgekit export phi3-mini --target onnx-int4
        edgekit export ./my-checkpoint --target gguf-q4_k_m --out dist/my-q4
        edgekit export smollm2-135m --target all --no-verify
        edgekit export smollm2-135m --target onnx-int4 --tune
    """
    results = api.export(
        model,
        target,
        out,
        verify=run_verify,
        force=force,
        revision=revision,
        offline=offline,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        recipe=parse_sets(recipe_set),
        tune=tune,
        eval_text=eval_text,
        long_context=long_context,
        thresholds=threshold_overrides(max_kld, min_top1, max_ppl_ratio),
        progress=progress_for(quiet),
    )
    # a tuned bundle was verified while tuning (its parity.json is inside); as before, only the
    # plain export prints and gates its reports here
    reports = [r.parity for r in results if r.parity is not None and not tune]
    for r in results:
        err(
            f"wrote {r.bundle}  ({r.format}, {r.size_bytes / 2**20:.1f} MiB, {r.files} files, "
            f"{r.wall_s:.1f} s, peak RSS {r.peak_rss_mb:.0f} MiB, via {r.path_taken})"
        )
        if r.parity is not None and not tune and not as_json:
            print_parity(r.parity)
    if as_json:
        emit_json({"bundles": [r.to_dict() for r in results], "parity": [p.to_dict() for p in reports]})
    api.parity_gate(reports)


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
def verify(
    bundles: tuple[str, ...],
    eval_text: str | None,
    reference: str | None,
    window: int | None,
    long_context: bool | None,
    max_kld: float | None,
    min_top1: float | None,
    max_ppl_ratio: float | None,
    offline: bool | None,
    trust_remote_code: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Check BUNDLES against the unquantized reference; exit 3 if a threshold fails.

    Reports KL divergence, top-1 agreement, perplexity ratio, greedy continuation,
    tokenizer and chat-template agreement, and writes parity.json into each bundle.

    \b
    Example:
        edgekit verify dist/phi3-mini-onnx-int4
        edgekit verify dist/x --eval-text my_domain.txt --json
    """
    progress = progress_for(quiet)
    reports = [
        api.verify(
            b,
            eval_text=eval_text,
            reference=reference,
            window=window,
            offline=offline,
            trust_remote_code=trust_remote_code,
            progress=progress,
            long_context=long_context,
            thresholds=threshold_overrides(max_kld, min_top1, max_ppl_ratio),
        )
        for b in bundles
    ]
    if as_json:
        emit_json({"reports": [r.to_dict() for r in reports]})
    else:
        for r in reports:
            print_parity(r)
    api.parity_gate(reports)


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--prompt", "-p", required=True, help="The user message (or raw text with --raw).")
@click.option("--max-tokens", default=128, show_default=True, type=int, help="Maximum tokens to generate.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--system", help="A system message for the chat template.")
@click.option("--threads", type=int, help="Runtime threads (default: the runtime's choice).")
@click.option(
    "--reference",
    is_flag=True,
    help="Then answer the same prompt with the unquantized checkpoint the bundle was exported from "
    "(transformers), and say where and by how much the two answers part.",
)
@json_option
def run(
    bundle: str,
    prompt: str,
    max_tokens: int,
    raw: bool,
    system: str | None,
    threads: int | None,
    reference: bool,
    as_json: bool,
) -> None:
    """Generate from BUNDLE with its own runtime, streaming tokens to stdout.

    The bundle is validated (hashes, files) before it is loaded. With --reference the
    checkpoint named in the bundle's manifest answers too (greedy, same prompt ids), so a
    quantized answer can be told from the model's own.

    \b
    Example:
        edgekit run dist/my-q4 --prompt "What is the capital of France?"
        edgekit run dist/my-q4 --prompt "What is the capital of France?" --reference
    """

    def stream(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    result = api.run(
        bundle,
        prompt,
        max_tokens=max_tokens,
        raw=raw,
        system=system,
        threads=threads,
        on_text=None if as_json else stream,
    )
    if not as_json:
        click.echo()
        _run_status(result)
    if not reference:
        if as_json:
            emit_json(result.to_dict())
        return
    if not as_json:
        err("[reference: the unquantized checkpoint in transformers, same prompt]")
    ref = api.run_reference(
        bundle,
        prompt,
        max_tokens=max_tokens,
        raw=raw,
        system=system,
        threads=threads,
        on_text=None if as_json else stream,
    )
    divergence = ref.divergence(result.token_ids, result.stopped_by)
    same_ids = result.prompt_ids == ref.result.prompt_ids
    if as_json:
        emit_json(
            {
                **result.to_dict(),
                "reference": ref.result.to_dict(),
                "prompt_ids_match": same_ids,
                "divergence": divergence.to_dict() if divergence else None,
            }
        )
        return
    click.echo()
    err(
        f"[reference ({ref.dtype}, transformers): {ref.result.prompt_tokens} prompt tokens, "
        f"{ref.result.generated_tokens} generated, stopped by {ref.result.stopped_by}]"
    )
    if not same_ids:
        err(
            f"[warning: the bundle was fed other prompt ids than the reference: {list(result.prompt_ids)} vs {list(ref.result.prompt_ids)}]"
        )
    err(f"[{divergence.describe()}]" if divergence else "[the bundle's answer is the reference's]")


def _run_status(result: api.RunResult) -> None:
    err(
        f"[{result.format}: {result.prompt_tokens} prompt tokens, {result.generated_tokens} generated, "
        f"TTFT {result.ttft_ms:.0f} ms, {result.decode_tok_s:.1f} tok/s, stopped by {result.stopped_by}]"
    )


@cli.command()
@click.argument("bundles", nargs=-1, type=click.Path())
@click.option("--profile", "-p", help="Device profile from targets/profiles.toml (default: detected from this host).")
@click.option("--reps", default=5, show_default=True, type=int, help="Timed repetitions after the warm-up.")
@click.option("--warmup", default=1, show_default=True, type=int, help="Untimed warm-up generations.")
@click.option("--prompt-tokens", type=int, help="Prompt length in tokens (default: the profile's).")
@click.option("--gen-tokens", type=int, help="Tokens generated per repetition, EOS ignored (default: the profile's).")
@click.option(
    "--set",
    "profile_set",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a profile key, e.g. --set max_peak_rss_mb=512 or --set threads=1.",
)
@click.option("--output", "-o", type=click.Path(), help="Append one JSON line per record to this file.")
@click.option("--no-manifest", is_flag=True, help="Do not write the results into the bundles' manifest.json.")
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def bench(
    bundles: tuple[str, ...],
    profile: str | None,
    reps: int,
    warmup: int,
    prompt_tokens: int | None,
    gen_tokens: int | None,
    profile_set: tuple[str, ...],
    output: str | None,
    no_manifest: bool,
    as_json: bool,
    quiet: bool,
) -> None:
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
    records = api.bench(
        bundles,
        profile=profile,
        reps=reps,
        warmup=warmup,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        overrides=parse_sets(profile_set),
        output=output,
        write_manifest=not no_manifest,
        progress=progress_for(quiet),
    )
    if as_json:
        emit_json([r.to_dict() for r in records])
    elif not quiet:
        print_bench_table(records)
    bench_gate(records)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@json_option
def validate(paths: tuple[str, ...], as_json: bool) -> None:
    """Check bundle directories or tarballs against their manifests; exit 4 naming the first bad file.

    Checks the manifest schema, every file's size and sha256, and that no file is missing or
    extra. Tarballs are checked member by member (no absolute paths, `..`, links or devices)
    before anything is extracted.

    \b
    Example:
        edgekit validate dist/phi3-mini-gguf-q4_k_m.tar.gz
        edgekit validate dist/phi3-mini-onnx-int4
    """
    results = []
    for p in paths:
        m = api.validate(p)
        results.append(
            {"path": p, "format": m["format"], "files": len(m["files"]), "size_bytes": bundle_size(m), "valid": True}
        )
        if not as_json:
            err(f"ok: {p} ({m['format']}, {len(m['files'])} files, sha256 and sizes match the manifest)")
    if as_json:
        emit_json(results)
