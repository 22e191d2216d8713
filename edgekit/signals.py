"""SIGTERM handling shared by the CLI and the child processes it starts."""

from __future__ import annotations

import signal
from types import FrameType


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so staging directories are removed on the way out.
    raise KeyboardInterrupt


def install_sigterm() -> None:
    signal.signal(signal.SIGTERM, on_sigterm)
