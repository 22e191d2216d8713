"""Resolve what the user typed (path, hub id or alias) to a checked local checkpoint.

Everything that can be wrong with a checkpoint is found here, before a long export starts,
and reported as one line with the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import catalog
from .errors import BadInput, OfflineError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Files that define the model's behaviour and so enter the content hash.
HASHED_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja") + PICKLE_SUFFIXES
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointLike(Protocol):
    """What the reference, the importance matrix and the layer-by-layer model read of a
    checkpoint: a resolved Checkpoint has it, and so does CheckpointFiles."""

    @property
    def path(self) -> Path: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def trust_remote_code(self) -> bool: ...


@dataclass(frozen=True)
class CheckpointFiles:
    """A checkpoint directory as a child process knows it from its job (no resolve() there)."""

    path: Path
    config: dict[str, Any]
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    requested: str  # what the user typed
    kind: str  # "local" | "hub" | "alias"
    architecture: str
    config: dict[str, Any] = field(repr=False)
    alias: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    weight_files: tuple[str, ...] = ()
    pickle_weights: bool = False

    def provenance(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "kind": self.kind,
            "alias": self.alias,
            "hub_id": self.hub_id,
            "revision": self.revision,
            "path": str(self.path),
            "architecture": self.architecture,
            "content_sha256": content_hash(self.path),
            "config": self.config,
            "model_card": card_metadata(self.path, self.config),
        }

    @property
    def short_name(self) -> str:
        if self.alias:
            return self.alias
        if self.hub_id:
            return self.hub_id.split("/")[-1].lower()
        return self.path.name.lower() or "model"


def resolve(
    model: str,
    *,
    revision: str | None = None,
    offline: bool | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Checkpoint:
    """Turn a local directory, hub id or catalog alias into a validated Checkpoint."""
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model and path.exists()
    if path.exists() or (looks_like_path and not HUB_ID.match(model)):
        return _local(path, model, "local", trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    alias = catalog.lookup(model)
    if alias is not None:
        if alias.embedded:
            from . import embedded

            local = embedded.ensure_checkpoint(alias.name)
            return _local(
                local,
                model,
                "alias",
                alias=alias.name,
                hub_id=alias.hub_id,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
            )
        local = _from_hub(alias.hub_id, revision, offline, requested=model)
        return _local(
            local,
            model,
            "alias",
            alias=alias.name,
            hub_id=alias.hub_id,
            revision=revision,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )

    if HUB_ID.match(model):
        local = _from_hub(model, revision, offline, requested=model)
        return _local(
            local,
            model,
            "hub",
            hub_id=model,
            revision=revision,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )

    raise BadInput(
        f"'{model}' is not a directory, a hub id (org/name) or a known alias",
        f"Known aliases: {', '.join(sorted(catalog.ALIASES))}",
    )


def _from_hub(repo_id: str, revision: str | None, offline: bool, requested: str) -> Path:
    """Local Hugging Face cache first; the hub only when allowed and reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # README.md: the model card, whose license the bundle's own card carries over (card_metadata)
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "README.md"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    fix = (
        f"Download it where the hub is reachable (huggingface-cli download {repo_id}) "
        f"or pass a local checkpoint directory instead of '{requested}'"
    )
    if offline:
        raise OfflineError(f"'{repo_id}' is not in the local Hugging Face cache and edgekit is offline", fix)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, etag_timeout=5))
    except Exception as e:  # noqa: BLE001 - network stack raises many types
        name = type(e).__name__
        if "NotFound" in name or "404" in str(e):
            raise BadInput(f"'{repo_id}' was not found on the hub", "Check the id or pass a local directory") from None
        raise OfflineError(f"cannot reach the Hugging Face hub for '{repo_id}' ({name})", fix) from None


def _local(
    path: Path,
    requested: str,
    kind: str,
    *,
    alias: str | None = None,
    hub_id: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool,
    allow_pickle: bool,
) -> Checkpoint:
    if not path.exists():
        raise BadInput(f"no such directory: {path}", "Pass a Hugging Face checkpoint directory, a hub id or an alias")
    if not path.is_dir():
        raise BadInput(f"{path} is a file, not a checkpoint directory", "Pass the directory that holds config.json")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise BadInput(
            f"{path} has no config.json", "Pass a Hugging Face checkpoint directory (save_pretrained output)"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{cfg_path} is not valid JSON ({e})", "Repair or re-download config.json") from None
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise BadInput(f"{cfg_path} names no architecture", 'Add "architectures": ["...ForCausalLM"] to config.json')
    if config.get("auto_map") and not trust_remote_code:
        raise BadInput(
            f"{path} needs custom Python code from the model repo (auto_map in config.json)",
            "Pass --trust-remote-code only if you trust its authors: that code runs on this machine",
        )

    safetensors = sorted(p.name for p in path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if safetensors:
        for name in safetensors:
            check_safetensors(path / name)
        weights, is_pickle = tuple(safetensors), False
    elif pickles:
        if not allow_pickle:
            raise BadInput(
                f"{path} has only pickle weights ({pickles[0]}); loading pickle can run arbitrary code",
                "Convert to safetensors, or pass --allow-pickle if you trust the file",
            )
        weights, is_pickle = tuple(pickles), True
    else:
        raise BadInput(
            f"{path} has no weights (*.safetensors)", "Save the model with save_pretrained(safe_serialization=True)"
        )

    if not any((path / t).is_file() for t in TOKENIZER_FILES):
        raise BadInput(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model)",
            "Save the tokenizer beside the model (tokenizer.save_pretrained)",
        )
    _check_vocab(path, config)
    return Checkpoint(
        path=path.resolve(),
        requested=requested,
        kind=kind,
        architecture=archs[0],
        config=config,
        alias=alias,
        hub_id=hub_id,
        revision=revision,
        trust_remote_code=trust_remote_code,
        weight_files=weights,
        pickle_weights=is_pickle,
    )


def check_safetensors(file: Path) -> None:
    """Reject a truncated file or a header whose offsets point past the end, without loading it."""
    size = file.stat().st_size
    bad = BadInput(
        f"{file} is not a valid safetensors file (truncated or corrupt header)", "Re-download or re-save the checkpoint"
    )
    if size < 8:
        raise bad
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, 100 * 2**20):
            raise bad
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad from None
    if not isinstance(header, dict):
        raise bad
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad from None
        if not (0 <= begin <= stop):
            raise bad
        end = max(end, stop)
    if 8 + n + end > size:
        raise BadInput(
            f"{file} is truncated: its header needs {8 + n + end} bytes, the file has {size}",
            "Re-download or re-save the checkpoint",
        )


def _check_vocab(path: Path, config: dict[str, Any]) -> None:
    """A tokenizer with more ids than the embedding has rows produces out-of-range ids."""
    vocab_size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    tj = path / "tokenizer.json"
    if not vocab_size or not tj.is_file():
        return
    try:
        data = json.loads(tj.read_text(encoding="utf-8"))
        model_vocab = data.get("model", {}).get("vocab", {})
        ids = list(model_vocab.values()) if isinstance(model_vocab, dict) else list(range(len(model_vocab)))
        ids += [t.get("id", 0) for t in data.get("added_tokens", [])]
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise BadInput(f"{tj} is not valid JSON", "Re-save the tokenizer") from None
    top = max(ids, default=-1)
    if top >= vocab_size:
        raise BadInput(
            f"tokenizer has token id {top} but config.json vocab_size is {vocab_size}",
            "The tokenizer does not belong to this model: save the matching tokenizer",
        )


# Model-card keys a bundle's card carries over from its source checkpoint: how the model may be
# used is the source's to state and quantizing does not change it ("other" licenses come with
# a name and a link).
CARRIED_CARD_KEYS = ("license", "license_name", "license_link")


def card_metadata(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """The source's license keys as its model card (README.md front matter) states them, else
    config.json's "license"; {} when neither says: a license is never guessed. A card whose
    YAML does not parse says nothing. A relative license_link points into the source repo,
    which a bundle does not hold, so only an absolute one is carried."""
    found: dict[str, str] = {}
    readme = Path(path) / "README.md"
    if readme.is_file():
        import yaml
        from huggingface_hub import metadata_load  # the hub's own front-matter reader

        try:
            meta = metadata_load(readme) or {}
        except (yaml.YAMLError, ValueError, UnicodeDecodeError):
            meta = {}
        found = {k: meta[k].strip() for k in CARRIED_CARD_KEYS if isinstance(meta.get(k), str) and meta[k].strip()}
    if "license" not in found and isinstance(config.get("license"), str) and config["license"].strip():
        found = {"license": config["license"].strip()}
    if not found.get("license"):
        return {}
    if not found.get("license_link", "").startswith(("https://", "http://")):
        found.pop("license_link", None)
    return found


def content_hash(path: Path) -> str:
    """sha256 over (relative name, sha256) of every file that defines the model's behaviour.

    Per-file digests are cached on disk keyed by (absolute path, size, mtime_ns), so exporting
    or verifying the same multi-GB checkpoint again does not re-read it.
    """
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.name.endswith(HASHED_SUFFIXES))
    cache = _DigestCache()
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        h.update(cache.digest(p).encode())
    cache.save()
    return h.hexdigest()


class _DigestCache:
    """A small JSON map in the edgekit cache; a damaged or unwritable file only costs a re-hash."""

    def __init__(self):
        from .paths import cache_dir

        self.file = cache_dir() / "file-digests.json"
        try:
            self.data = json.loads(self.file.read_text())
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def digest(self, p: Path) -> str:
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.data:
            self.data[key] = sha256_file(p)
            self.dirty = True
        return self.data[key]

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.file)
        except OSError:
            pass


def sha256_file(p: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
