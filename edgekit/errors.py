"""Typed errors. Each carries the exit code the CLI returns and a fix for the user.

Exit codes (documented in README.md):
  0 success, 1 unexpected error, 2 bad input or usage, 3 a quality gate failed,
  4 an integrity check failed, 130 interrupted (SIGINT or SIGTERM).
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base error: one line naming the problem, optionally followed by the fix."""

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.problem}. {self.fix}" if self.fix else self.problem
        return " ".join(text.split("\n"))  # a quoted tool message must not break the one-line promise


class BadInput(EdgekitError):
    """The user gave something we cannot use: a path, a name, a flag value."""

    exit_code = 2


class UnsupportedArchitecture(BadInput):
    pass


class OfflineError(BadInput):
    """The model is not available locally and the hub cannot (or must not) be reached."""


class GateFailed(EdgekitError):
    """A quality, size or memory threshold was not met."""

    exit_code = 3


class IntegrityError(EdgekitError):
    """A bundle's files do not match its manifest, or a tarball is unsafe."""

    exit_code = 4


class ToolFailed(EdgekitError):
    """An underlying converter or runtime failed; the message carries its last words."""

    exit_code = 1


class OutOfMemory(ToolFailed):
    """A converter or runtime child was killed by the kernel while memory was nearly gone."""

    exit_code = 1
