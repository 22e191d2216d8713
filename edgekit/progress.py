"""Progress reporting on stderr. Library code talks to the `Progress` protocol; the CLI
passes a rich-backed one, the Python API a silent one unless asked.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Step(Protocol):
    def advance(self, n: float = 1) -> None: ...
    def update(self, completed: float, total: float | None = None) -> None: ...


class Progress(Protocol):
    def step(self, name: str, total: float | None = None) -> AbstractContextManager[Step]: ...
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


class _PlainStep:
    """Progress for a log (CI): a line when the step starts, then at least every `every`
    seconds while it runs (a heartbeat thread, so a step that reports nothing for minutes,
    such as loading a 14B checkpoint, still shows it is alive), and one when it ends."""

    def __init__(self, name: str, total: float | None, write: Callable[[str], None], every: float) -> None:
        import threading
        import time

        self.name, self.total, self._write, self._every = name, total, write, every
        self.completed = 0.0
        self._clock = time.monotonic
        self._t0 = self._clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def start(self) -> None:
        self._write(f"{self.name} ...")
        self._thread.start()

    def advance(self, n: float = 1) -> None:
        with self._lock:
            self.completed += n

    def update(self, completed: float, total: float | None = None) -> None:
        with self._lock:
            self.completed = completed
            if total is not None:
                self.total = total

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            self._write(self.line())

    def line(self, done: bool = False) -> str:
        with self._lock:
            completed, total = self.completed, self.total
        elapsed = self._clock() - self._t0
        text = f"{self.name}: "
        if done:
            return text + f"done in {_duration(elapsed)}"
        if total:
            share = min(completed / total, 1.0)
            text += f"{completed:g}/{total:g} ({share:.0%}), {_duration(elapsed)} elapsed"
            if share > 0:
                text += f", ETA {_duration(elapsed * (1 - share) / share)}"
            return text
        return text + f"{_duration(elapsed)} elapsed"

    def finish(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._write(self.line(done=True))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class RichProgress:
    """On a terminal, a bar per long step (spinner when the total is unknown) with elapsed
    time and ETA. When stderr is not a terminal (a CI log), plain lines instead: one when a
    step starts, one at least every `heartbeat_s` seconds, one when it ends."""

    def __init__(self, quiet: bool = False, heartbeat_s: float = 30.0, terminal: bool | None = None):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.heartbeat_s = heartbeat_s
        self.terminal = self.console.is_terminal if terminal is None else terminal

    @contextmanager
    def step(self, name: str, total: float | None = None) -> Iterator[Step]:
        if self.quiet:
            yield _NullStep()
            return
        if not self.terminal:
            plain = _PlainStep(name, total, self._line, self.heartbeat_s)
            plain.start()
            try:
                yield plain
            finally:
                plain.finish()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as Bar,
        )

        bar = Bar(
            SpinnerColumn(),
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        with bar:
            task = bar.add_task(name, total=total)
            yield _RichStep(bar, task)
            t = bar.tasks[0]
            if t.total is not None:
                bar.update(task, completed=t.total)

    def _line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False)


def stderr_note(text: str) -> None:
    print(text, file=sys.stderr)
