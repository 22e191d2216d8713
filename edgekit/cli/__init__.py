"""The `edgekit` command: Click only; every command is a thin client of edgekit.api."""

from . import bundles, matrix  # noqa: F401 - registers the commands on the group
from .group import cli, main

__all__ = ["cli", "main"]
