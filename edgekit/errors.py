"""Typed errors. Each carries the exit code the CLI returns and a fix for the user.

Exit codes (documented in README.md):
  0 success, 1 unexpected error, 2 bad input or usage, 3 a quality gate failed,
  4 an integrity check failed, 130 interrupted (SIGINT or SIGTERM).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What the CLI returns; documented in README.md. Scripts in release pipelines branch on these."""

    OK = 0
    ERROR = 1  # unexpected error, a tool failed, out of memory
    BAD_INPUT = 2  # bad input or usage: a path, a name, a flag value
    GATE_FAILED = 3  # a quality, size, speed or memory threshold was not met
    INTEGRITY = 4  # a bundle's files do not match its manifest, or a tarball is unsafe
    INTERRUPTED = 130  # SIGINT or SIGTERM


class EdgekitError(Exception):
    """Base error: one line naming the problem, optionally followed by the fix."""

    exit_code: int = ExitCode.ERROR

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.problem}. {self.fix}" if self.fix else self.problem
        return " ".join(text.split("\n"))  # a quoted tool message must not break the one-line promise


class BadInput(EdgekitError):
    """The user gave something we cannot use: a path, a name, a flag value."""

    exit_code = ExitCode.BAD_INPUT


class UnsupportedArchitecture(BadInput):
    pass


class OfflineError(BadInput):
    """The model is not available locally and the hub cannot (or must not) be reached."""


class GateFailed(EdgekitError):
    """A quality, size or memory threshold was not met."""

    exit_code = ExitCode.GATE_FAILED


class IntegrityError(EdgekitError):
    """A bundle's files do not match its manifest, or a tarball is unsafe."""

    exit_code = ExitCode.INTEGRITY


class ToolFailed(EdgekitError):
    """An underlying converter or runtime failed; the message carries its last words."""

    exit_code = ExitCode.ERROR


class OutOfMemory(ToolFailed):
    """A converter or runtime child was killed by the kernel while memory was nearly gone."""

    exit_code = ExitCode.ERROR
