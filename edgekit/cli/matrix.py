"""Commands over many bundles: eval, select, build, report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .. import api
from ..build import BuildFailed
from ..errors import BadInput
from ..evaluate import print_table
from ..report import write_report
from ..select import NoFeasibleBundle, Selection, print_selection
from ..summary import render_markdown
from .group import CommandFn, cli, emit_json, err, json_option, progress_for


def eval_options(f: CommandFn) -> CommandFn:
    """Options shared by eval and select: which items, on which profile, against what."""
    f = click.option(
        "--tasks", "-t", type=click.Path(), help="JSONL task file (default: the shipped edgekit-basic set)."
    )(f)
    f = click.option("--limit", type=int, help="Only the first N items of the task file.")(f)
    f = click.option(
        "--profile", "-p", help="Device profile from targets/profiles.toml (default: detected from this host)."
    )(f)
    f = click.option(
        "--no-reference", is_flag=True, help="Skip the unquantized reference row (no deltas, flips or drop)."
    )(f)
    f = click.option(
        "--reference", "reference_ckpt", help="The unquantized checkpoint (default: the one in each manifest)."
    )(f)
    f = click.option("--case-sensitive", is_flag=True, help="exact/contains: do not fold case.")(f)
    f = click.option("--keep-whitespace", is_flag=True, help="exact/contains: do not collapse whitespace.")(f)
    f = click.option(
        "--keep-punctuation", is_flag=True, help="exact/contains: do not strip leading/trailing punctuation."
    )(f)
    f = click.option(
        "--max-paraphrase-drop",
        type=float,
        default=0.10,
        show_default=True,
        help="Robustness threshold for paraphrase drop.",
    )(f)
    f = click.option(
        "--max-format-sensitivity",
        type=float,
        default=0.05,
        show_default=True,
        help="Robustness threshold for format sensitivity.",
    )(f)
    f = click.option("--offline", is_flag=True, default=None, help="Never contact the hub for the reference.")(f)
    f = click.option(
        "--trust-remote-code", is_flag=True, help="Allow the reference checkpoint's own Python code to run."
    )(f)
    return f


def _eval_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    norm = {
        "case": False if kw.pop("case_sensitive") else None,
        "whitespace": False if kw.pop("keep_whitespace") else None,
        "punctuation": False if kw.pop("keep_punctuation") else None,
    }
    no_ref, ckpt = kw.pop("no_reference"), kw.pop("reference_ckpt")
    if no_ref and ckpt:
        raise BadInput("--reference and --no-reference contradict each other", "Drop one of them")
    return {**kw, "normalization": norm, "reference": False if no_ref else (ckpt or True)}


def select_options(f: CommandFn) -> CommandFn:
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
def eval_(
    bundles: tuple[str, ...], output: str | None, no_manifest: bool, pick: bool, as_json: bool, quiet: bool, **kw: Any
) -> None:
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
    limits = {k: kw.pop(k) for k in _CONSTRAINTS}
    if any(v is not None for v in limits.values()) and not pick:
        raise BadInput(
            "constraints (--min-accuracy, --max-p95-ms, ...) need --pick", "Add --pick, or use edgekit select"
        )
    report = api.evaluate(
        bundles,
        output=output,
        write_manifest=not no_manifest,
        progress=progress_for(quiet),
        **_eval_kwargs(kw),
    )
    if not quiet and not as_json:
        print_table(report)
    elif not quiet:
        for w in report.warnings:
            err(f"warning: {w}")
    doc = report.to_dict()
    if pick:
        _select_and_print(lambda: api.select(list(report.bundles), **limits), doc, as_json, quiet)
    elif as_json:
        emit_json(doc)


def _select_and_print(run: Callable[[], Selection], doc: dict[str, Any] | None, as_json: bool, quiet: bool) -> None:
    error = None
    try:
        selection = run()
    except NoFeasibleBundle as e:
        error, selection = e, e.selection
    if as_json:
        emit_json({**(doc or {}), "selection": selection.to_dict()})
    elif not quiet:
        print_selection(selection)
    if error is not None:
        raise error
    if not as_json:
        err(f"pick: {selection.pick}")


@cli.command("select")
@click.argument("bundles", nargs=-1, type=click.Path())
@select_options
@click.option(
    "--from", "from_json", type=click.Path(), help="Use an `edgekit eval --json` document instead of evaluating."
)
@click.option("--stored", is_flag=True, help="Use the eval results stored in the bundles' manifests for --tasks.")
@eval_options
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def select_(
    bundles: tuple[str, ...], from_json: str | None, stored: bool, as_json: bool, quiet: bool, **kw: Any
) -> None:
    """Pick the bundle to ship: the Pareto set over accuracy, p95 latency, peak RSS and size,
    the most accurate bundle meeting every constraint (ties: lower RSS, then smaller), and why
    each other bundle lost. Exit 3 naming the nearest miss when none is feasible.

    Evaluates BUNDLES first (as `edgekit eval`), unless --from or --stored says where results are.

    \b
    Example:
        edgekit select dist/*/ --tasks my-tasks.jsonl --min-accuracy 0.8 --max-p95-ms 1500 --max-rss-mb 3000
        edgekit eval dist/*/ --json > eval.json && edgekit select --from eval.json --max-accuracy-drop 0.02
    """
    limits = {k: kw.pop(k) for k in _CONSTRAINTS}
    if from_json and (bundles or stored):
        raise BadInput("--from takes the bundles from the eval document", "Drop the bundle arguments or --stored")
    ekw = _eval_kwargs(kw)
    if from_json or stored:
        extra = {}
    else:
        extra = {k: v for k, v in ekw.items() if k not in ("tasks", "limit")}
        extra["progress"] = progress_for(quiet)
    _select_and_print(
        lambda: api.select(
            bundles=bundles,
            from_json=from_json,
            stored=stored,
            tasks=ekw["tasks"],
            limit=ekw["limit"],
            **limits,
            **extra,
        ),
        None,
        as_json,
        quiet,
    )


@cli.command()
@click.option("--config", "-c", type=click.Path(), help="Build config (default: ./edgekit.toml).")
@click.option("--out", "-o", type=click.Path(), help="Output directory (default: [build] out, else dist/).")
@click.option("--force", is_flag=True, help="Rebuild every entry even if its inputs are unchanged.")
@click.option(
    "--baseline",
    type=click.Path(),
    help="A previous build's output directory: fail on regressions beyond the config's margins.",
)
@click.option("--shard", metavar="K/N", help="Build only the K-th of N deterministic slices of the matrix.")
@click.option(
    "--merge",
    "merge_dirs",
    multiple=True,
    type=click.Path(),
    metavar="DIR",
    help="Combine shard outputs (repeat --merge DIR) into --out instead of building.",
)
@click.option("--offline", is_flag=True, default=None, help="Never contact the hub.")
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def build(
    config: str | None,
    out: str | None,
    force: bool,
    baseline: str | None,
    shard: str | None,
    merge_dirs: tuple[str, ...],
    offline: bool | None,
    as_json: bool,
    quiet: bool,
) -> None:
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
    if merge_dirs and (shard or force or config):
        raise BadInput("--merge combines finished shards; it takes no --shard, --force or --config", "Drop them")
    if merge_dirs and not out:
        raise BadInput("--merge needs --out DIR for the combined output", "Add --out")
    progress = progress_for(quiet)
    error = None
    try:
        if merge_dirs and out:  # (--merge without --out was refused above)
            summary = api.merge(list(merge_dirs), out, baseline=baseline, progress=progress)
        else:
            summary = api.build(
                config, out=out, force=force, baseline=baseline, shard=shard, offline=offline, progress=progress
            )
    except BuildFailed as e:  # outputs are written; show them, then exit with the worst code
        error, summary = e, e.summary
    if as_json:
        emit_json(summary)
    elif not quiet:
        err(render_markdown(summary))
    if error is not None:
        raise error


@cli.command()
@click.argument("directory", type=click.Path())
@click.option("--out", "-o", type=click.Path(), help="HTML file to write (default: DIRECTORY/report.html).")
def report(directory: str, out: str | None) -> None:
    """Write a self-contained HTML report (summary table, quality/speed/size trade-off with the
    Pareto front, peak RSS against budgets) from a build's summary.json.

    \b
    Example:
        edgekit report dist/ --out report.html
    """
    path = write_report(directory, out)
    err(f"wrote {path}")
