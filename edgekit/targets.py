"""Load the targets (formats and device profiles, TOML files) into frozen dataclasses.

The TOML files are the single source of truth for recipes and profiles; code never
hard-codes a block size or a thread count. Unknown keys are errors naming key and file.

The shipped files live inside the package (edgekit/data/targets/, read through
importlib.resources, so an installed wheel has them). A user's own directory
(`edgekit --targets-dir DIR`, or $EDGEKIT_TARGETS_DIR) lies on top: a format file there
replaces the shipped file of the same name (a recipe tuned for a fleet) or adds a format; the
profiles of its profiles.toml are added to the shipped ones, replacing those of the same name.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import BadInput

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

PROFILES_FILE = "profiles.toml"


USER_DIR_ENV = "EDGEKIT_TARGETS_DIR"

T = TypeVar("T", bound="DataclassInstance")  # the recipe dataclass dataclass_from_table builds


def targets_dir() -> Path:
    """The shipped targets, inside the package."""
    from importlib import resources

    return Path(str(resources.files("edgekit").joinpath("data", "targets")))


def user_targets_dir() -> Path | None:
    """The user's own targets directory ($EDGEKIT_TARGETS_DIR; `--targets-dir` sets it), if any."""
    value = os.environ.get(USER_DIR_ENV)
    return Path(value) if value else None


@dataclass(frozen=True)
class FormatSpec:
    name: str
    description: str
    runtime: str
    model_files: tuple[str, ...]
    recipe: dict[str, Any] = field(default_factory=dict)  # typed by the format module
    thresholds: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    # `edgekit export --tune` candidates: ({"name": str, "set": {recipe key: value}}, ...)
    tune: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    formats: tuple[str, ...]
    threads: int | str = "physical"
    gpu_layers: int = 0
    context: int = 4096
    prompt_tokens: int = 128
    gen_tokens: int = 64
    accuracy_level: int | None = None
    max_peak_rss_mb: float | None = None
    max_bundle_mb: float | None = None
    min_decode_tok_s: float | None = None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: malformed TOML ({e})", "Fix the syntax at the line named") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})", "Check the path and permissions") from None


def check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BadInput(
            f"{where}: unknown key '{unknown[0]}'",
            f"Allowed keys: {', '.join(sorted(allowed))}",
        )


def _format_from_file(path: Path) -> FormatSpec:
    data = read_toml(path)
    check_keys(data, {"format", "recipe", "thresholds", "tune"}, str(path))
    fmt = data.get("format")
    if not isinstance(fmt, dict):
        raise BadInput(f"{path}: missing [format] table", "Add [format] with name, description, runtime")
    check_keys(fmt, {"name", "description", "runtime", "model_files"}, f"{path} [format]")
    for key in ("name", "description", "runtime"):
        if not isinstance(fmt.get(key), str):
            raise BadInput(f"{path} [format]: '{key}' must be a string", f'Set {key} = "..."')
    files = fmt.get("model_files", [])
    if not isinstance(files, list) or not all(isinstance(x, str) for x in files):
        raise BadInput(f"{path} [format]: 'model_files' must be a list of strings", "Fix model_files")
    for table in ("recipe", "thresholds"):
        if not isinstance(data.get(table, {}), dict):
            raise BadInput(f"{path}: [{table}] must be a table", f"Write it as [{table}]")
    return FormatSpec(
        name=fmt["name"],
        description=fmt["description"],
        runtime=fmt["runtime"],
        model_files=tuple(files),
        recipe=dict(data.get("recipe", {})),
        thresholds=dict(data.get("thresholds", {})),
        source=str(path),
        tune=_tune_candidates(data.get("tune", []), path),
    )


def _tune_candidates(items: Any, path: Path) -> tuple[dict[str, Any], ...]:
    """[[tune]] tables: each a name and the recipe keys it sets (checked by the format later)."""
    if not isinstance(items, list):
        raise BadInput(f"{path}: 'tune' must be an array of tables", "Write each candidate as [[tune]]")
    out = []
    for i, item in enumerate(items):
        where = f"{path} [[tune]] #{i + 1}"
        if not isinstance(item, dict):
            raise BadInput(f"{where}: must be a table", "Write it as [[tune]] with name and set")
        check_keys(item, {"name", "set"}, where)
        if not isinstance(item.get("name"), str) or not isinstance(item.get("set", {}), dict):
            raise BadInput(f'{where}: needs name = "..." and set = {{ key = value }}', "Fix the candidate")
        out.append({"name": item["name"], "set": dict(item.get("set", {}))})
    return tuple(out)


_PROFILE_TYPES = {
    "description": (str,),
    "formats": (list,),
    "threads": (int, str),
    "gpu_layers": (int,),
    "context": (int,),
    "prompt_tokens": (int,),
    "gen_tokens": (int,),
    "accuracy_level": (int,),
    "max_peak_rss_mb": (int, float),
    "max_bundle_mb": (int, float),
    "min_decode_tok_s": (int, float),
}


def parse_profile(name: str, table: dict[str, Any], where: str, known_formats: set[str]) -> Profile:
    check_keys(table, set(_PROFILE_TYPES), where)
    for key, types in _PROFILE_TYPES.items():
        if key in table and (not isinstance(table[key], types) or isinstance(table[key], bool)):
            raise BadInput(f"{where}: '{key}' has the wrong type", f"Expected {types[0].__name__}")
    formats = tuple(table.get("formats", ()))
    for f in formats:
        if f not in known_formats:
            raise BadInput(f"{where}: unknown format '{f}'", f"Known formats: {', '.join(sorted(known_formats))}")
    if isinstance(table.get("threads"), str) and table["threads"] not in ("physical", "performance"):
        raise BadInput(f"{where}: threads must be a number, 'physical' or 'performance'", "Fix threads")
    kwargs = {k: v for k, v in table.items() if k != "formats"}
    kwargs.setdefault("description", "")
    return Profile(name=name, formats=formats, **kwargs)


@dataclass(frozen=True)
class Targets:
    formats: dict[str, FormatSpec]
    profiles: dict[str, Profile]

    def format(self, name: str) -> FormatSpec:
        if name not in self.formats:
            raise BadInput(
                f"unknown target '{name}'",
                f"Choose one of: {', '.join(sorted(self.formats))}, all",
            )
        return self.formats[name]

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise BadInput(
                f"unknown profile '{name}'",
                f"Choose one of: {', '.join(sorted(self.profiles))}",
            )
        return self.profiles[name]


def load_targets(directory: Path | None = None) -> Targets:
    """The shipped targets with the user's directory on top; or exactly `directory`'s."""
    if directory is not None:
        return _load((str(directory),))
    user = user_targets_dir()
    return _load((str(targets_dir()),) + ((str(user),) if user else ()))


def _files(directories: tuple[str, ...]) -> tuple[dict[str, Path], list[Path]]:
    """Format files by name (later directories replacing earlier ones) and every profiles file
    in order (their profiles are merged by name, later ones winning)."""
    found: dict[str, Path] = {}
    profile_files: list[Path] = []
    for i, directory in enumerate(directories):
        root = Path(directory)
        if not root.is_dir():
            if i == 0:
                raise BadInput(f"targets directory not found: {root}", "Reinstall edgekit")
            raise BadInput(
                f"targets directory not found: {root} ({USER_DIR_ENV} or --targets-dir)",
                "Point it at a directory of *.toml target files, or unset it",
            )
        found.update({p.name: p for p in sorted(root.glob("*.toml")) if p.name != PROFILES_FILE})
        if (root / PROFILES_FILE).is_file():
            profile_files.append(root / PROFILES_FILE)
    return found, profile_files


@lru_cache(maxsize=8)
def _load(directories: tuple[str, ...]) -> Targets:
    files, profile_files = _files(directories)
    formats: dict[str, FormatSpec] = {}
    for _name, path in sorted(files.items()):  # by file name: the order formats are listed in
        spec = _format_from_file(path)
        if spec.name != path.stem:
            raise BadInput(
                f"{path}: format name '{spec.name}' does not match the file name", f"Rename to {spec.name}.toml"
            )
        formats[spec.name] = spec
    profiles: dict[str, Profile] = {}
    for ppath in profile_files:
        data = read_toml(ppath)
        check_keys(data, {"profiles"}, str(ppath))
        tables = data.get("profiles", {})
        if not isinstance(tables, dict):
            raise BadInput(f"{ppath}: 'profiles' must be tables", "Write each profile as [profiles.<name>]")
        for name, table in tables.items():
            if not isinstance(table, dict):
                raise BadInput(f"{ppath}: profiles.{name} must be a table", f"Write it as [profiles.{name}]")
            profiles[name] = parse_profile(name, table, f"{ppath} [profiles.{name}]", set(formats))
    return Targets(formats=formats, profiles=profiles)


def dataclass_from_table(cls: type[T], table: dict[str, Any], where: str) -> T:
    """Build a frozen recipe dataclass from a TOML table, rejecting unknown keys and wrong types."""
    names = {f.name: f for f in fields(cls)}
    check_keys(table, set(names), where)
    kwargs = {}
    for key, value in table.items():
        default = getattr(cls, key, None)
        expected = type(default) if default is not None else None
        an_int_for_a_float = expected is float and isinstance(value, int)
        if expected is not None and not isinstance(value, expected) and not an_int_for_a_float:
            raise BadInput(f"{where}: '{key}' must be {expected.__name__}, got {value!r}", f"Fix {key}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
