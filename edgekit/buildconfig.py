"""`edgekit.toml`: the release matrix (models x formats x profiles), read into frozen dataclasses.

Every table's keys are checked; an unknown or mistyped key is an error naming the key, the
file and its line, because a silently ignored typo in a release config ships the wrong thing.
A commented example lives at the repository root (edgekit.toml).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput
from .targets import load_targets

DEFAULT_CONFIG = "edgekit.toml"

_BUDGET_KEYS = {"max_peak_rss_mb": (int, float), "max_bundle_mb": (int, float), "min_decode_tok_s": (int, float)}

# Margins for --baseline: how far a figure may move against the previous release before the
# build fails. Relative margins are fractions of the baseline figure.
REGRESSION_DEFAULTS: dict[str, float] = {
    "kld_mean_rel": 0.25,  # KLD may grow by 25 % (it is small and noisy in absolute terms)
    "top1_agreement_abs": 0.02,  # top-1 agreement may drop by 2 points
    "ppl_ratio_abs": 0.02,  # PPL ratio may grow by 0.02
    "decode_tok_s_rel": 0.15,  # decode speed may drop 15 % (CI runners are noisy)
    "prefill_tok_s_rel": 0.25,
    "size_rel": 0.02,  # bundle size may grow 2 %
    "peak_rss_rel": 0.10,  # peak RSS may grow 10 %
}


_EVAL_LIMITS = ("min_accuracy", "max_accuracy_drop", "max_flip_rate", "max_paraphrase_drop", "max_format_sensitivity")


@dataclass(frozen=True)
class EvalConfig:
    """[eval]: run a task file on every entry after bench; each limit set is a gate."""

    tasks: str | None = None  # path (relative to the config); None: the shipped set
    limit: int | None = None
    reference: bool = True
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    max_flip_rate: float | None = None
    max_paraphrase_drop: float | None = None
    max_format_sensitivity: float | None = None

    def limits(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in _EVAL_LIMITS}


@dataclass(frozen=True)
class ModelEntry:
    name: str  # bundle names are <name>-<format>
    source: str  # alias, hub id or path (relative paths: to the config's directory)
    revision: str | None
    formats: tuple[str, ...]
    profiles: tuple[str, ...]
    recipe: dict[str, dict[str, Any]] = field(default_factory=dict)  # per format
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)  # per format
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)  # per profile
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class Job:
    """One cell of the matrix: a model in one format, benchmarked on `profiles`."""

    id: str
    model: ModelEntry
    format: str
    profiles: tuple[str, ...]

    def budgets(self, config: BuildConfig, profile: str) -> dict[str, float]:
        return {**config.budgets.get(profile, {}), **self.model.budgets.get(profile, {})}


@dataclass(frozen=True)
class BuildConfig:
    path: str
    sha256: str
    out: str
    models: tuple[ModelEntry, ...]
    reps: int = 3
    warmup: int = 1
    prompt_tokens: int | None = None
    gen_tokens: int | None = None
    eval_text: str | None = None
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)
    regression: dict[str, float] = field(default_factory=lambda: dict(REGRESSION_DEFAULTS))
    eval: EvalConfig | None = None

    def jobs(self) -> list[Job]:
        """The matrix in a fixed order (model name, format): shards slice this list."""
        jobs = [
            Job(f"{m.name}-{f}", m, f, tuple(p for p in m.profiles if f in _profile_formats(p)))
            for m in self.models
            for f in m.formats
        ]
        return sorted(jobs, key=lambda j: j.id)


def _profile_formats(profile: str) -> tuple[str, ...]:
    return load_targets().profile(profile).formats


class _Where:
    """Names a key with its file and line for error messages."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()

    def line(self, key: str, table: str | None = None, nth: int = 0) -> int | None:
        start = 0
        if table is not None:
            header = re.compile(r"^\s*\[\[?\s*" + re.escape(table) + r"\s*\]\]?\s*$")
            seen = -1
            for i, text in enumerate(self.lines):
                if header.match(text):
                    seen += 1
                    if seen == nth:
                        start = i
                        break
        pat = re.compile(r"^\s*(\[\[?\s*)?([\w.\-\"]*\.)?\"?" + re.escape(key) + r"\"?\s*(=|\]|\.)")
        for i in range(start, len(self.lines)):
            if pat.match(self.lines[i]):
                return i + 1
        return None

    def at(self, key: str, table: str | None = None, nth: int = 0) -> str:
        n = self.line(key, table, nth)
        return f"{self.path}:{n}" if n else str(self.path)


def _check_keys(table: dict[str, Any], allowed: set[str], where: _Where, tname: str | None, nth: int = 0) -> None:
    for key in table:
        if key not in allowed:
            raise BadInput(
                f"{where.at(key, tname, nth)}: unknown key '{key}'" + (f" in [{tname}]" if tname else ""),
                f"Allowed keys: {', '.join(sorted(allowed))}",
            )


def _expect(value: Any, types: tuple[type, ...], key: str, where: _Where, tname: str | None, nth: int = 0) -> Any:
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise BadInput(f"{where.at(key, tname, nth)}: '{key}' must be {names}, got {value!r}", f"Fix {key}")
    return value


def _str_list(value: Any, key: str, where: _Where, tname: str | None, nth: int = 0) -> tuple[str, ...]:
    _expect(value, (list,), key, where, tname, nth)
    if not all(isinstance(x, str) for x in value):
        raise BadInput(f"{where.at(key, tname, nth)}: '{key}' must be a list of strings", f"Fix {key}")
    return tuple(value)


def _budgets(
    table: Any, key: str, where: _Where, tname: str | None, profiles: set[str], nth: int = 0
) -> dict[str, dict[str, float]]:
    _expect(table, (dict,), key, where, tname, nth)
    out = {}
    for profile, limits in table.items():
        if profile not in profiles:
            raise BadInput(
                f"{where.at(profile, tname, nth)}: unknown profile '{profile}' in {key}",
                f"Choose one of: {', '.join(sorted(profiles))}",
            )
        _expect(limits, (dict,), profile, where, tname, nth)
        for k, v in limits.items():
            if k not in _BUDGET_KEYS:
                raise BadInput(
                    f"{where.at(k, tname, nth)}: unknown budget '{k}'", f"Allowed: {', '.join(sorted(_BUDGET_KEYS))}"
                )
            _expect(v, _BUDGET_KEYS[k], k, where, tname, nth)
        out[profile] = {k: float(v) for k, v in limits.items()}
    return out


def _per_format(table: Any, key: str, where: _Where, formats: set[str], nth: int) -> dict[str, dict[str, Any]]:
    _expect(table, (dict,), key, where, "model", nth)
    for fmt, sub in table.items():
        if fmt not in formats:
            raise BadInput(
                f"{where.at(fmt, 'model', nth)}: unknown format '{fmt}' in {key}",
                f"Choose one of: {', '.join(sorted(formats))}",
            )
        _expect(sub, (dict,), fmt, where, "model", nth)
    return {f: dict(v) for f, v in table.items()}


def load_config(path: str | Path | None = None) -> BuildConfig:
    """Read and check an edgekit.toml. Raises BadInput (exit 2) naming the key and line."""
    path = Path(path or DEFAULT_CONFIG)
    if not path.is_file():
        raise BadInput(
            f"no build config at {path}",
            "Write an edgekit.toml (see the example in the edgekit repository) or pass --config FILE",
        )
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise BadInput(f"{path} is not UTF-8 text", "Save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: malformed TOML ({e})", "Fix the syntax at the line named") from None
    where = _Where(path, text)
    targets = load_targets()
    formats, profiles = set(targets.formats), set(targets.profiles)

    _check_keys(data, {"build", "budgets", "regression", "model", "eval"}, where, None)
    build = _expect(data.get("build", {}), (dict,), "build", where, None)
    _check_keys(
        build,
        {"out", "formats", "profiles", "reps", "warmup", "prompt_tokens", "gen_tokens", "eval_text"},
        where,
        "build",
    )
    default_formats = _str_list(build.get("formats", sorted(formats)), "formats", where, "build")
    default_profiles = _str_list(build.get("profiles", ["laptop-cpu"]), "profiles", where, "build")
    for key in ("reps", "warmup", "prompt_tokens", "gen_tokens"):
        if key in build:
            _expect(build[key], (int,), key, where, "build")
            if build[key] < (0 if key == "warmup" else 1):
                raise BadInput(
                    f"{where.at(key, 'build')}: '{key}' must be at least {0 if key == 'warmup' else 1}", f"Fix {key}"
                )
    out = _expect(build.get("out", "dist"), (str,), "out", where, "build")
    eval_text = build.get("eval_text")
    if eval_text is not None:
        _expect(eval_text, (str,), "eval_text", where, "build")
        eval_text = str((path.parent / eval_text) if not Path(eval_text).is_absolute() else Path(eval_text))

    budgets = _budgets(data.get("budgets", {}), "budgets", where, None, profiles)
    regression = dict(REGRESSION_DEFAULTS)
    reg = _expect(data.get("regression", {}), (dict,), "regression", where, None)
    _check_keys(reg, set(REGRESSION_DEFAULTS), where, "regression")
    for k, v in reg.items():
        regression[k] = float(_expect(v, (int, float), k, where, "regression"))
        if regression[k] < 0:
            raise BadInput(f"{where.at(k, 'regression')}: '{k}' must not be negative", f"Fix {k}")

    eval_cfg = _eval(data["eval"], where, path) if "eval" in data else None

    items = data.get("model", [])
    if not isinstance(items, list) or not items:
        raise BadInput(f"{path}: no [[model]] entries", 'Add at least one [[model]] with source = "..."')
    models, names = [], set()
    allowed = {
        "source",
        "name",
        "revision",
        "formats",
        "profiles",
        "recipe",
        "thresholds",
        "budgets",
        "trust_remote_code",
        "allow_pickle",
    }
    for nth, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadInput(f"{path}: [[model]] #{nth + 1} must be a table", "Write it as [[model]]")
        _check_keys(item, allowed, where, "model", nth)
        source = item.get("source")
        if not isinstance(source, str) or not source:
            raise BadInput(
                f'{where.at("source", "model", nth)}: [[model]] #{nth + 1} needs source = "alias, hub id or path"',
                "Add source",
            )
        local = path.parent / source
        if not Path(source).is_absolute() and (source.startswith(".") or local.is_dir()):
            source = str(local.resolve())
        name = item.get("name", Path(source.rstrip("/")).name if "/" in source else source)
        _expect(name, (str,), "name", where, "model", nth)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise BadInput(
                f"{where.at('name', 'model', nth)}: name '{name}' is not a safe file name",
                "Use letters, digits, '.', '_' and '-'",
            )
        if name in names:
            raise BadInput(
                f"{where.at('name', 'model', nth)}: two [[model]] entries are named '{name}'",
                "Give each a distinct name",
            )
        names.add(name)
        fmts = _str_list(item.get("formats", list(default_formats)), "formats", where, "model", nth)
        profs = _str_list(item.get("profiles", list(default_profiles)), "profiles", where, "model", nth)
        for f in fmts:
            if f not in formats:
                raise BadInput(
                    f"{where.at('formats', 'model', nth)}: unknown format '{f}'",
                    f"Choose from: {', '.join(sorted(formats))}",
                )
        for p in profs:
            if p not in profiles:
                raise BadInput(
                    f"{where.at('profiles', 'model', nth)}: unknown profile '{p}'",
                    f"Choose from: {', '.join(sorted(profiles))}",
                )
        revision = item.get("revision")
        if revision is not None:
            _expect(revision, (str,), "revision", where, "model", nth)
        for flag in ("trust_remote_code", "allow_pickle"):
            _expect(item.get(flag, False), (bool,), flag, where, "model", nth)
        models.append(
            ModelEntry(
                name=name,
                source=source,
                revision=revision,
                formats=fmts,
                profiles=profs,
                recipe=_per_format(item.get("recipe", {}), "recipe", where, formats, nth),
                thresholds=_per_format(item.get("thresholds", {}), "thresholds", where, formats, nth),
                budgets=_budgets(item.get("budgets", {}), "budgets", where, "model", profiles, nth),
                trust_remote_code=item.get("trust_remote_code", False),
                allow_pickle=item.get("allow_pickle", False),
            )
        )
    for fmt in default_formats:
        if fmt not in formats:
            raise BadInput(
                f"{where.at('formats', 'build')}: unknown format '{fmt}'", f"Choose from: {', '.join(sorted(formats))}"
            )
    for p in default_profiles:
        if p not in profiles:
            raise BadInput(
                f"{where.at('profiles', 'build')}: unknown profile '{p}'", f"Choose from: {', '.join(sorted(profiles))}"
            )
    return BuildConfig(
        path=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
        out=out,
        models=tuple(models),
        reps=build.get("reps", 3),
        warmup=build.get("warmup", 1),
        prompt_tokens=build.get("prompt_tokens"),
        gen_tokens=build.get("gen_tokens"),
        eval_text=eval_text,
        budgets=budgets,
        regression=regression,
        eval=eval_cfg,
    )


def _eval(table: Any, where: _Where, path: Path) -> EvalConfig:
    _expect(table, (dict,), "eval", where, None)
    _check_keys(table, {"tasks", "limit", "reference", *_EVAL_LIMITS}, where, "eval")
    tasks = table.get("tasks")
    if tasks is not None:
        _expect(tasks, (str,), "tasks", where, "eval")
        tasks = str(path.parent / tasks) if not Path(tasks).is_absolute() else tasks
    limit = table.get("limit")
    if limit is not None and (_expect(limit, (int,), "limit", where, "eval") < 1):
        raise BadInput(f"{where.at('limit', 'eval')}: 'limit' must be at least 1", "Fix limit")
    for key in _EVAL_LIMITS:
        if key in table:
            v = _expect(table[key], (int, float), key, where, "eval")
            if not 0 <= v <= 1:
                raise BadInput(f"{where.at(key, 'eval')}: '{key}' must be between 0 and 1, got {v}", f"Fix {key}")
    reference = _expect(table.get("reference", True), (bool,), "reference", where, "eval")
    if not reference and any(k in table for k in ("max_accuracy_drop", "max_flip_rate")):
        raise BadInput(
            f"{where.at('reference', 'eval')}: max_accuracy_drop and max_flip_rate need reference = true",
            "Drop those gates or the reference = false",
        )
    return EvalConfig(
        tasks=tasks, limit=limit, reference=reference, **{k: float(table[k]) for k in _EVAL_LIMITS if k in table}
    )


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
