"""The `edgekit` command group: options shared by commands, and the mapping of library errors
to one line and an exit code. Commands live in edgekit.cli.bundles and edgekit.cli.matrix;
all of them are thin Click clients of edgekit.api. No logic lives here.

Human text and progress go to stderr; `--json` prints exactly one JSON document on stdout and
leaves progress on stderr (`-q` silences it); an error is the last line of stderr.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import __version__
from ..errors import EdgekitError, ExitCode
from ..progress import RichProgress
from ..signals import install_sigterm
from ..targets import USER_DIR_ENV

# A Click command function, before and after an option decorator adds its parameters.
CommandFn = TypeVar("CommandFn", bound=Callable[..., Any])

EXIT_CODES_HELP = "Exit codes: 0 ok, 1 unexpected error, 2 bad input, 3 quality gate failed, 4 integrity check failed, 130 interrupted."


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def err(text: str) -> None:
    click.echo(text, err=True)


def json_option(f: CommandFn) -> CommandFn:
    # Progress stays on stderr with --json: a CI log of a 38-minute export step must show it
    # is alive, and stdout holds only the document. -q is what silences it.
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print one JSON document on stdout (progress stays on stderr; -q silences it).",
    )(f)


def model_options(f: CommandFn) -> CommandFn:
    """Options shared by every command that reads a checkpoint."""
    f = click.option("--revision", help="Hub revision (branch, tag or commit) for a hub id.")(f)
    f = click.option(
        "--offline", is_flag=True, default=None, help="Never contact the hub; fail fast if the model is not cached."
    )(f)
    f = click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Allow Python code shipped with the model repo to run (off by default).",
    )(f)
    f = click.option(
        "--allow-pickle", is_flag=True, help="Allow pickle weights (*.bin, *.pt); they can run code when loaded."
    )(f)
    return f


def threshold_options(f: CommandFn) -> CommandFn:
    f = click.option("--max-kld", type=float, help="Override kld_mean_max from targets/<format>.toml.")(f)
    f = click.option("--min-top1", type=float, help="Override top1_agreement_min.")(f)
    f = click.option("--max-ppl-ratio", type=float, help="Override ppl_ratio_max.")(f)
    return f


def long_context_option(f: CommandFn) -> CommandFn:
    return click.option(
        "--long-context/--no-long-context",
        "long_context",
        default=None,
        help="Probe parity past the original context (a prompt below it, then token by token across it). "
        "Default: on for checkpoints whose RoPE changes there (LongRoPE, Llama 3 scaling, YaRN).",
    )(f)


def threshold_overrides(max_kld: float | None, min_top1: float | None, max_ppl_ratio: float | None) -> dict[str, Any]:
    return {"kld_mean_max": max_kld, "top1_agreement_min": min_top1, "ppl_ratio_max": max_ppl_ratio}


def progress_for(quiet: bool) -> RichProgress:
    return RichProgress(quiet=quiet)


class _Failure(click.ClickException):
    """An error already phrased for the user: one line on stderr, its own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance; its stub says ClassVar

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class EdgekitGroup(click.Group):
    """Maps library errors to one line and an exit code; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("EDGEKIT_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except EdgekitError as e:
            if debug:
                raise
            raise _Failure(e.one_line(), e.exit_code) from None
        except KeyboardInterrupt:
            raise _Failure("interrupted; nothing was written", ExitCode.INTERRUPTED) from None
        except OSError as e:
            if debug:
                raise
            if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise _Failure(
                    f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", ExitCode.ERROR
                ) from None
            raise _Failure(
                f"disk full while writing {e.filename or 'the output'} ({e.strerror}); nothing was published. "
                "Free space or choose another --out",
                ExitCode.ERROR,
            ) from None
        except Exception as e:
            if debug:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            raise _Failure(
                f"unexpected {type(e).__name__}: {first} (rerun with --debug for the traceback)", ExitCode.ERROR
            ) from None


@click.group(cls=EdgekitGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "--version", prog_name="edgekit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option(
    "--targets-dir",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Your own target files on top of the shipped ones: a DIR/<name>.toml replaces the shipped file "
    "of that name, a new one adds a format (also $EDGEKIT_TARGETS_DIR).",
)
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
        # An environment variable, not a parameter: build and bench children read it too.
        os.environ[USER_DIR_ENV] = str(Path(targets_dir).resolve())


def main() -> None:
    """Console entry point."""
    install_sigterm()
    cli(prog_name="edgekit")
