"""The short README written into every bundle: how to run it with the plain runtime.

The text is the format's (its backend's README_TEMPLATE); the fields every README shares are
filled here, the format's own ones (e.g. the GGUF quantization type) by its readme_fields.
"""

from __future__ import annotations

from typing import Any

from .formats import backend


def render(name: str, manifest: dict[str, Any]) -> str:
    source = manifest.get("source", {})
    fmt = backend(manifest["format"])
    fields = {
        "name": name,
        "model": source.get("alias") or source.get("hub_id") or source.get("requested"),
        "version": manifest.get("edgekit_version"),
        "sha": source.get("content_sha256", "")[:16],
        **fmt.readme_fields(manifest),
    }
    return fmt.README_TEMPLATE.format(**fields)
