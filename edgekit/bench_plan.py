"""edgekit bench, the parent's first half: profile and bundles in, one checked Run per bundle out.

Every input is checked here, before any child starts: a bad bundle, profile or token count
gets one line and no half-run benchmark. What differs by format (the bundle's own context
cap, the KV cache's element size, GPU offload, compile-time settings the profile asks about)
comes from the format's backend (edgekit.formats.FormatBackend.bench_setup).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .bundle import bundle_size, validate
from .errors import BadInput
from .formats import backend
from .host import HostFacts
from .targets import Profile, _profile, load_targets


@dataclass(frozen=True)
class Run:
    """Everything one child needs, resolved from the profile, the bundle and this host."""

    bundle: str
    format: str
    model: str
    profile: str
    profile_source: str            # "requested" | "detected"
    threads: int
    gpu_layers: int
    context: int
    prompt_tokens: int
    gen_tokens: int
    reps: int
    warmup: int
    accuracy_level: int | None     # a compute type fixed at export (the backend says), None if none
    model_bytes: int
    bundle_bytes: int
    kv_bytes_per_token: int        # K and V, all layers, one position
    max_peak_rss_mb: float | None = None
    max_bundle_mb: float | None = None
    min_decode_tok_s: float | None = None
    substitutions: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def detect_profile(host: HostFacts) -> tuple[str, str]:
    """(profile name, why): Apple silicon -> m-series, anything else -> laptop-cpu."""
    if host.apple_silicon:
        return "m-series", f"this host is Apple silicon ({host.cpu})"
    return "laptop-cpu", f"this host is {host.os.split()[0]} {host.machine}, not Apple silicon"


def choose_profile(name: str | None, overrides: dict[str, Any] | None,
                   host: HostFacts) -> tuple[Profile, str, str]:
    """(profile, "requested" | "detected", why): the profile named or detected for this host,
    with `overrides` (--set KEY=VALUE) checked as strictly as targets/profiles.toml."""
    targets = load_targets()
    source, why = "requested", ""
    if name is None:
        name, why = detect_profile(host)
        source = "detected"
    profile = targets.profile(name)
    if overrides:
        table = {k: v for k, v in dataclasses.asdict(profile).items() if k != "name" and v is not None}
        table["formats"] = list(profile.formats)
        table.update(overrides)
        # the same checks as targets/profiles.toml gets: unknown keys and wrong types are errors
        profile = _profile(name, table, f"--set for profile {name}", set(targets.formats))
    return profile, source, why


def discover_bundles(root: Path = Path("dist")) -> list[Path]:
    """Bundle directories under `root` (dist/<bundle> and dist/<group>/<bundle>)."""
    if not root.is_dir():
        return []
    found = [m.parent for pattern in ("*/manifest.json", "*/*/manifest.json") for m in root.glob(pattern)]
    return sorted(p for p in set(found) if not any(part.startswith(".") for part in p.relative_to(root).parts))


def _threads(profile: Profile, host: HostFacts) -> tuple[int, list[str]]:
    want = profile.threads
    if want == "physical":
        return host.physical_cores, []
    if want == "performance":
        if host.performance_cores:
            return host.performance_cores, []
        return host.physical_cores, [
            f"threads: the profile asks for the performance-core count; this host does not report one "
            f"(not Apple silicon), so its {host.physical_cores} physical cores"]
    if isinstance(want, str):
        raise BadInput(f"threads must be a number, \"physical\" or \"performance\", got {want!r}",
                       "Fix threads in the profile or --set threads=N")
    if want < 1:
        raise BadInput(f"threads must be at least 1, got {want}", "Fix threads in the profile or --set threads=N")
    if want > host.logical_cores:
        return host.logical_cores, [
            f"threads: the profile asks for {want}; this host has {host.logical_cores} logical cores, "
            f"so {host.logical_cores}"]
    return int(want), []


def _text_config(manifest: dict[str, Any]) -> dict[str, Any]:
    config = manifest.get("source", {}).get("config") or {}
    return config.get("text_config") or config


def _trained_context(manifest: dict[str, Any], bundle_limit: int | None) -> int | None:
    """The model's trained context, capped by what the bundle's own files allow."""
    cfg = _text_config(manifest)
    candidates = [cfg.get("max_position_embeddings"), cfg.get("n_positions"), bundle_limit]
    values = [int(v) for v in candidates if isinstance(v, int) and v > 0]
    return min(values) if values else None


def kv_bytes_per_token(manifest: dict[str, Any], elem_bytes: int) -> int | None:
    """K and V for one position across all layers, from manifest["source"]["config"]."""
    cfg = _text_config(manifest)
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return 2 * layers * kv_heads * head_dim * elem_bytes


def _model_bytes(manifest: dict[str, Any]) -> int:
    names = {n for n in load_targets().format(manifest["format"]).model_files if not n.endswith(".json")}
    return sum(int(e["size"]) for e in manifest["files"] if e["path"] in names)


def _model_name(bundle: Path, manifest: dict[str, Any]) -> str:
    src = manifest.get("source", {})
    return src.get("alias") or src.get("hub_id") or (Path(src["path"]).name if src.get("path") else bundle.name)


def plan(bundles: Sequence[str | Path], profile: Profile, profile_source: str, host: HostFacts, *, reps: int, warmup: int,
         prompt_tokens: int | None, gen_tokens: int | None, notes: list[str] | None = None) -> list[Run]:
    """Check every input and resolve one Run per bundle; raises before anything runs.
    Bundles found in dist/ that the profile does not take are skipped, with a line in `notes`."""
    prompt_tokens = profile.prompt_tokens if prompt_tokens is None else prompt_tokens
    gen_tokens = profile.gen_tokens if gen_tokens is None else gen_tokens
    if prompt_tokens < 1:
        raise BadInput(f"--prompt-tokens must be at least 1, got {prompt_tokens}", "Pass a positive number")
    if gen_tokens < 2:
        raise BadInput(f"--gen-tokens must be at least 2 (decode speed is measured after the first token), "
                       f"got {gen_tokens}", "Pass 2 or more")
    discovered = not bundles
    if discovered:
        bundles = discover_bundles()
        if not bundles:
            raise BadInput("no bundles given and none found in dist/", "Pass bundle directories, e.g. edgekit bench dist/my-bundle")
    threads, thread_subs = _threads(profile, host)
    runs = []
    for b in bundles:
        bundle = Path(b)
        manifest = validate(bundle)  # hashes and file list, before any runtime sees the files
        fmt = manifest["format"]
        if fmt not in profile.formats:
            if discovered:
                if notes is not None:
                    notes.append(f"skipping {bundle}: profile {profile.name} takes {', '.join(profile.formats)}, not {fmt}")
                continue
            raise BadInput(f"profile {profile.name} does not take {fmt} bundles ({bundle})",
                           f"It takes {', '.join(profile.formats)}; choose another --profile")
        setup = backend(fmt).bench_setup(bundle, manifest, profile)
        trained = _trained_context(manifest, setup.context_limit)
        context = min(profile.context, trained) if trained else profile.context
        if prompt_tokens + gen_tokens > context:
            whose = f"profile {profile.name}" if context == profile.context else "the model's trained context"
            raise BadInput(f"--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} = {prompt_tokens + gen_tokens} "
                           f"exceed the context of {context} ({whose}) for {bundle}",
                           "Lower --prompt-tokens or --gen-tokens")
        subs, notes = [*thread_subs, *setup.substitutions], []
        elem = setup.kv_element_bytes
        kv = kv_bytes_per_token(manifest, elem) if elem else None
        if kv is None:
            notes.append("KV cache size unknown (config or graph unreadable): bandwidth utilization counts weights only")
        runs.append(Run(
            bundle=str(bundle), format=fmt, model=_model_name(bundle, manifest), profile=profile.name,
            profile_source=profile_source, threads=threads,
            gpu_layers=setup.gpu_layers,
            context=context, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, reps=reps, warmup=warmup,
            accuracy_level=setup.accuracy_level, model_bytes=_model_bytes(manifest), bundle_bytes=bundle_size(manifest),
            kv_bytes_per_token=kv or 0, max_peak_rss_mb=profile.max_peak_rss_mb, max_bundle_mb=profile.max_bundle_mb,
            min_decode_tok_s=profile.min_decode_tok_s, substitutions=tuple(subs), notes=tuple(notes),
        ))
    if not runs:
        raise BadInput(f"none of the bundles in dist/ is a {' or '.join(profile.formats)} bundle",
                       "Pass bundle directories, or choose another --profile")
    return runs
