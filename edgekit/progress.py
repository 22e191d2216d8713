"""Progress reporting on stderr. Library code talks to the `Progress` protocol; the CLI
passes a rich-backed one, the Python API a silent one unless asked.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Protocol


class Step(Protocol):
    def advance(self, n: float = 1) -> None: ...
    def update(self, completed: float, total: float | None = None) -> None: ...


class Progress(Protocol):
    def step(self, name: str, total: float | None = None) -> "contextmanager[Step]": ...
    def note(self, text: str) -> None: ...


class _NullStep:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, completed: float, total: float | None = None) -> None:
        pass


class NullProgress:
    """Silent: the default for library calls."""

    @contextmanager
    def step(self, name: str, total: float | None = None) -> Iterator[Step]:
        yield _NullStep()

    def note(self, text: str) -> None:
        pass


class _RichStep:
    def __init__(self, bar, task):
        self._bar, self._task = bar, task

    def advance(self, n: float = 1) -> None:
        self._bar.advance(self._task, n)

    def update(self, completed: float, total: float | None = None) -> None:
        if total is not None:
            self._bar.update(self._task, total=total)
        self._bar.update(self._task, completed=completed)


class RichProgress:
    """A bar per long step (spinner when the total is unknown), elapsed time, on stderr."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet

    @contextmanager
    def step(self, name: str, total: float | None = None) -> Iterator[Step]:
        if self.quiet:
            yield _NullStep()
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, SpinnerColumn,
                                   TextColumn, TimeElapsedColumn)

        bar = Bar(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=self.console, transient=False)
        with bar:
            task = bar.add_task(name, total=total)
            yield _RichStep(bar, task)
            t = bar.tasks[0]
            if t.total is not None:
                bar.update(task, completed=t.total)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False)


def stderr_note(text: str) -> None:
    print(text, file=sys.stderr)
