"""KEY=VALUE overrides (`--set block_size=64`): parsed into typed values for recipes and profiles."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import BadInput


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise BadInput(f"--set '{item}' is not KEY=VALUE", "Write e.g. --set block_size=64")
        key, value = item.split("=", 1)
        out[key.strip()] = coerce(value.strip())
    return out


def coerce(value: str) -> Any:
    """true/false -> bool, then int, then float, else the text (the recipe parser checks types)."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
