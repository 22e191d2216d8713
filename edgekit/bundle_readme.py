"""The README written into every bundle: a Hugging Face model card that people can read too.

It has three parts:
- YAML front matter (base model, library, tags, license) that the hub reads when the bundle
  is uploaded as a model repo; library_name and the format's tags come from its backend
  (card_metadata), the license from the source checkpoint's own card (manifest source.model_card),
  never guessed;
- the format's text (its backend's README_TEMPLATE, with readme_fields): how to run it with the
  plain runtime;
- the figures edgekit measured (parity, bench, eval), read from manifest.json.

Everything is read from the manifest, so verify, bench and eval re-render the README when they
change it (update_manifest, write_readme): a figure the manifest lacks reads "not measured",
never a stale or invented one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePath
from typing import Any

import yaml

from .bundle import read_manifest
from .bundle import update_manifest as bundle_update
from .fileio import write_text
from .formats import backend

README = "README.md"
NOT_MEASURED = "not measured"
# What every bundle is for, whatever its format: the hub's task for causal language models.
PIPELINE_TAG = "text-generation"


def front_matter(manifest: dict[str, Any]) -> dict[str, Any]:
    """The card's metadata, in the order a reader scans it."""
    source = manifest.get("source", {})
    card = backend(manifest["format"]).card_metadata(manifest)
    meta: dict[str, Any] = {}
    if source.get("hub_id"):  # an alias or hub id; a local directory has none to name
        meta["base_model"] = source["hub_id"]
        meta["base_model_relation"] = "quantized"
    meta.update(source.get("model_card") or {})  # license keys, only where the source states them
    meta["library_name"] = card["library_name"]
    meta["pipeline_tag"] = PIPELINE_TAG
    meta["quantized_by"] = "edgekit"
    tags = [*card["tags"], "edgekit"]
    if manifest.get("quantization", {}).get("mobile"):  # a recipe that builds for phones says so
        tags.append("mobile")
    meta["tags"] = tags
    return meta


def render(name: str, manifest: dict[str, Any]) -> str:
    source = manifest.get("source", {})
    fmt = backend(manifest["format"])
    fields = {
        "name": name,
        # A local checkpoint is named by its directory, not its full path: the card may be published.
        "model": source.get("alias") or source.get("hub_id") or PurePath(str(source.get("requested", ""))).name,
        "version": manifest.get("edgekit_version"),
        "sha": source.get("content_sha256", "")[:16],
        "figures": figures(manifest),
        **fmt.readme_fields(manifest),
    }
    # safe_dump quotes what YAML would misread (a license "1.0", a name with ": "); key order kept.
    meta = yaml.safe_dump(front_matter(manifest), sort_keys=False, allow_unicode=True)
    return f"---\n{meta}---\n\n" + fmt.README_TEMPLATE.format(**fields)


def figures(manifest: dict[str, Any]) -> str:
    """The "Measured" section: parity, speed and memory, task accuracy, each from the manifest."""
    return "\n\n".join([_parity(manifest.get("parity")), _bench(manifest.get("bench")), _eval(manifest.get("eval"))])


def _num(value: Any, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return NOT_MEASURED
    return format(value, spec)


def _parity(parity: dict[str, Any] | None) -> str:
    head = "Parity with the unquantized checkpoint (`edgekit verify`)"
    if not parity:
        return f"{head}: {NOT_MEASURED}."
    verdict = "passed" if parity.get("passed") else "failed: " + "; ".join(parity.get("failed") or ())
    return (
        f"{head}:\n\n"
        "| KLD mean | top-1 agreement | PPL ratio | thresholds |\n|---|---|---|---|\n"
        f"| {_num(parity.get('kld_mean'), '.4f')} | {_num(parity.get('top1_agreement'), '.3f')} "
        f"| {_num(parity.get('ppl_ratio'), '.3f')} | {verdict} |"
    )


def _bench(bench: dict[str, Any] | None) -> str:
    head = "Speed and memory (`edgekit bench`, the latest run per device profile and host)"
    rows = [
        (profile, host_id, rec)
        for profile, hosts in sorted((bench or {}).items())
        for host_id, rec in sorted((hosts or {}).items())
    ]
    if not rows:
        return f"{head}: {NOT_MEASURED}."
    lines = [
        f"| {profile} | {(rec.get('host') or {}).get('cpu') or host_id} | {rec.get('threads', NOT_MEASURED)} "
        f"| {_num(rec.get('decode_tok_s'), '.1f')} | {_num(rec.get('prefill_tok_s'), '.1f')} "
        f"| {_num(rec.get('peak_rss_mb'), '.0f')} |"
        for profile, host_id, rec in rows
    ]
    return (
        f"{head}:\n\n| profile | CPU | threads | decode tok/s | prefill tok/s | peak RSS MB |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(lines)
    )


def _eval(evaluation: dict[str, Any] | None) -> str:
    head = "Task accuracy (`edgekit eval`)"
    if not evaluation:
        return f"{head}: {NOT_MEASURED}."
    lines = [
        f"| {tasks} | {rec.get('n_items', NOT_MEASURED)} | {_num(rec.get('accuracy'), '.3f')} "
        f"| {_num(rec.get('accuracy_low'), '.3f')} to {_num(rec.get('accuracy_high'), '.3f')} "
        f"| {_num(rec.get('reference_accuracy'), '.3f')} |"
        for tasks, rec in sorted(evaluation.items())
    ]
    return (
        f"{head}:\n\n| tasks | items | accuracy | 95 % interval | unquantized reference |\n"
        "|---|---|---|---|---|\n" + "\n".join(lines)
    )


def write_readme(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Render README.md from `manifest` into `bundle`; return the manifest with that one file's
    entry (size, sha256) re-hashed, the rest unchanged, for the caller to write. A manifest that
    lists no README (an older edgekit's bundle) gets none, so `edgekit validate` still passes."""
    files = manifest.get("files", [])
    if not any(e.get("path") == README for e in files):
        return manifest
    text = render(manifest.get("name") or Path(bundle).name, manifest)
    write_text(Path(bundle) / README, text)
    data = text.encode("utf-8")
    entry = {"path": README, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {**manifest, "files": [entry if e.get("path") == README else e for e in files]}


def update_manifest(bundle: Path, **sections: Any) -> dict[str, Any]:
    """Replace top-level manifest sections (parity, bench, eval) and re-render README.md from
    the result: how verify, bench and eval record what they measured."""
    manifest = write_readme(Path(bundle), {**read_manifest(Path(bundle)), **sections})
    return bundle_update(Path(bundle), **sections, files=manifest["files"])
