"""llama.cpp's HF -> GGUF converter, fetched to match the installed llama-cpp-python.

The converter (`convert_hf_to_gguf.py` + its `conversion/` package + `gguf-py/`) is not in
the `gguf` wheel. It ships inside the llama-cpp-python sdist, vendored at the same llama.cpp
commit as the runtime we quantize and run with, so converter and runtime always agree on
tensor names and metadata keys. We take it from there rather than from a newer llama.cpp:
a converter ahead of the runtime can write GGUF keys or tensors the runtime cannot load.

Only the converter's own files are extracted (a few MB), into
`cache_dir()/llama.cpp/<version>/`, atomically. Set EDGEKIT_LLAMACPP_SDIST to a local sdist
(.tar.gz) to skip the download, e.g. on machines that reach no package index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from .errors import BadInput, IntegrityError, ToolFailed
from .paths import cache_dir
from .progress import NullProgress

if TYPE_CHECKING:
    from .progress import Progress

SDIST_ENV = "EDGEKIT_LLAMACPP_SDIST"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
SOURCE_FILE = "SOURCE.json"  # written last: its presence marks a complete extraction

# Where the converter lives inside the sdist, and which of its files we need.
_VENDOR = "vendor/llama.cpp/"
_WANTED_FILES = {CONVERTER_SCRIPT, "LICENSE", "gguf-py/pyproject.toml", "gguf-py/LICENSE"}
_WANTED_DIRS = ("conversion/", "gguf-py/gguf/")
# The sdist also carries git metadata; this file names the vendored llama.cpp commit.
_SUBMODULE_HEAD = ".git/modules/vendor/llama.cpp/HEAD"


def runtime_version() -> str:
    """Version of the installed llama-cpp-python (the runtime that quantizes and runs bundles)."""
    try:
        import llama_cpp
    except ImportError:
        raise BadInput(
            "llama-cpp-python is not installed", "pip install 'edgekit[runtimes]' (or llama-cpp-python) to export GGUF"
        ) from None
    return llama_cpp.__version__


def converter_dir(progress: Progress | None = None) -> Path:
    """Directory holding convert_hf_to_gguf.py, conversion/ and gguf-py/ for the installed runtime.

    Fetched once per llama-cpp-python version (from $EDGEKIT_LLAMACPP_SDIST or PyPI), then cached.
    """
    version = runtime_version()
    root = cache_dir() / "llama.cpp" / version
    if (root / SOURCE_FILE).is_file():
        return root
    progress = progress or NullProgress()
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgekit-sdist-") as download_dir:
        env_sdist = os.environ.get(SDIST_ENV)
        if env_sdist:
            sdist, origin = Path(env_sdist).expanduser(), f"{SDIST_ENV}={env_sdist}"
            if not sdist.is_file():
                raise BadInput(
                    f"{SDIST_ENV} points to {sdist}, which does not exist",
                    f"Set it to a llama-cpp-python {version} sdist (.tar.gz) or unset it",
                )
        else:
            with progress.step(f"fetch llama.cpp converter {version}"):
                sdist = _download_sdist(version, Path(download_dir))
            origin = "pypi"
        with progress.step("extract llama.cpp converter"):
            _extract_atomically(sdist, root, version, origin)
    return root


def converter_info() -> dict[str, str]:
    """Provenance of the cached converter for the installed runtime; empty if not fetched yet."""
    try:
        version = runtime_version()
    except BadInput:
        return {}
    source = cache_dir() / "llama.cpp" / version / SOURCE_FILE
    if not source.is_file():
        return {}
    return json.loads(source.read_text(encoding="utf-8"))


def _download_sdist(version: str, dest: Path) -> Path:
    """`pip download` the sdist; pip checks the index's hashes, so no checksum list is kept here."""
    public = version.split("+")[0]  # a local build tag (+cpu) is not on PyPI
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        f"llama-cpp-python=={public}",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.tar.gz"))
    if proc.returncode != 0 or len(found) != 1:
        last = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit code {proc.returncode}"
        raise ToolFailed(
            f"could not download the llama-cpp-python {public} sdist for its converter: {last}",
            f"Download it where PyPI is reachable (pip download --no-deps --no-binary :all: "
            f"llama-cpp-python=={public}) and set {SDIST_ENV}=/path/to/the.tar.gz",
        )
    return found[0]


def _extract_atomically(sdist: Path, root: Path, version: str, origin: str) -> None:
    """Extract into a sibling temp dir, then rename: a crash never leaves a half converter."""
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        commit = _extract_converter(sdist, tmp, version)
        source = {
            "llama_cpp_python": version,
            "llama_cpp_commit": commit,
            "gguf_py": _gguf_py_version(tmp),
            "sdist": sdist.name,
            "sdist_sha256": _sha256(sdist),
            "origin": origin,
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first (root exists, not empty): use its copy.
            if not (root / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _member_file(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """A regular member's contents (extractfile gives None only for other kinds, refused before)."""
    f = tar.extractfile(member)
    if f is None:
        raise BadInput(f"{member.name} in the sdist is not a regular file", "Re-download the llama-cpp-python sdist")
    return f


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    with _member_file(tar, member) as f:
        return f.read()


def _extract_converter(sdist: Path, dest: Path, version: str) -> str:
    """Write the converter's files from the sdist into dest; return the llama.cpp commit or ''.

    Members are copied by hand (no extractall): only regular files under the wanted paths,
    and any wanted member that is absolute, climbs with '..' or is a link rejects the sdist.
    """
    try:
        tar = tarfile.open(sdist, "r:*")  # noqa: SIM115 - closed by the `with tar:` below; opened apart to name a bad file
    except (tarfile.TarError, OSError) as e:
        raise BadInput(f"{sdist} is not a readable .tar.gz ({e})", "Re-download the llama-cpp-python sdist") from None
    commit, version_checked = "", False
    with tar:
        top = None
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not parts:
                continue
            top = top or parts[0]
            rel = "/".join(parts[1:])
            if rel == "PKG-INFO" and member.isreg():
                _check_sdist_version(_member_bytes(tar, member), version, sdist)
                version_checked = True
            if rel == _SUBMODULE_HEAD and member.isreg():
                commit = _member_bytes(tar, member).decode("ascii", "replace").strip()
            if not rel.startswith(_VENDOR):
                continue
            inner = rel[len(_VENDOR) :]
            if inner not in _WANTED_FILES and not inner.startswith(_WANTED_DIRS):
                continue
            if member.isdir():
                continue
            _check_member(member, parts, top, sdist)
            target = dest / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            with _member_file(tar, member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not version_checked:
        raise BadInput(
            f"{sdist.name} has no PKG-INFO, so its version is unknown",
            f"Use the llama-cpp-python {version} sdist from PyPI",
        )
    for needed in (CONVERTER_SCRIPT, "conversion/__init__.py", "gguf-py/gguf/__init__.py"):
        if not (dest / needed).is_file():
            raise BadInput(
                f"{sdist.name} has no {_VENDOR}{needed}", f"Use the llama-cpp-python {version} sdist from PyPI"
            )
    return commit if len(commit) == 40 else ""


def _check_member(member: tarfile.TarInfo, parts: tuple[str, ...], top: str | None, sdist: Path) -> None:
    unsafe = (
        member.name.startswith(("/", "\\"))
        or ".." in parts
        or parts[0] != top
        or not member.isreg()  # links, devices, fifos
    )
    if unsafe:
        raise IntegrityError(
            f"{sdist.name} has an unsafe member '{member.name}'",
            "Do not use this file; download the sdist again from PyPI",
        )


def _check_sdist_version(pkg_info: bytes, version: str, sdist: Path) -> None:
    for line in pkg_info.decode("utf-8", "replace").splitlines():
        if line.startswith("Version:"):
            found = line.split(":", 1)[1].strip()
            if found != version.split("+")[0]:
                raise BadInput(
                    f"{sdist.name} is llama-cpp-python {found}, but {version} is installed",
                    f"Converter and runtime must match: use the {version} sdist, or unset {SDIST_ENV}",
                )
            return


def _gguf_py_version(root: Path) -> str:
    import tomllib

    try:
        with open(root / "gguf-py" / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""
