"""Bundle tarballs: reproducible packing and extraction that checks every member first.

A tarball from someone else can carry absolute paths, `..`, links or device files that write
outside the destination when extracted. Every member is checked before a single byte is
written; the archive is read twice (check, then extract) rather than trusting a streaming pass.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import IntegrityError

# Fixed metadata so the same bundle always packs to the same bytes (SHA256SUMS stay stable).
_MTIME = 0
_MODE_FILE = 0o644
_MODE_DIR = 0o755


def pack(bundle: Path, tar_path: Path) -> str:
    """Write `bundle` as `<tar_path>` (gzip, one top-level directory named like the bundle),
    written to a temp file and renamed, with sorted members and fixed owner, mode and mtime.
    Returns the tarball's sha256."""
    bundle, tar_path = Path(bundle), Path(tar_path)
    root = bundle.name
    tmp = tar_path.with_name(f".{tar_path.name}.edgekit-tmp-{os.getpid()}")
    try:
        # gzip header mtime 0 and no file name: otherwise every pack differs.
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            tar.addfile(_info(root, dir=True))
            for p in sorted(bundle.rglob("*")):
                rel = p.relative_to(bundle).as_posix()
                if p.is_symlink():
                    raise IntegrityError(f"{p} is a symbolic link", "Bundles hold regular files only")
                if p.is_dir():
                    tar.addfile(_info(f"{root}/{rel}", dir=True))
                else:
                    info = _info(f"{root}/{rel}", size=p.stat().st_size)
                    with open(p, "rb") as f:
                        tar.addfile(info, f)
        os.replace(tmp, tar_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    from .checkpoint import sha256_file

    return sha256_file(tar_path)


def _info(name: str, *, dir: bool = False, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if dir else tarfile.REGTYPE
    info.mode = _MODE_DIR if dir else _MODE_FILE
    info.size = 0 if dir else size
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def check_members(tar_path: Path) -> tuple[str, list[tarfile.TarInfo]]:
    """Read the whole archive without writing anything. Returns (top-level directory, members).

    Raises IntegrityError (exit 4) naming the member for absolute paths, `..`, links, device
    files, FIFOs, more than one top-level directory, or a truncated or corrupt archive.
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        from .errors import BadInput

        raise BadInput(f"no such tarball: {tar_path}", "Pass a .tar.gz written by `edgekit build`")
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(tar_path, mode="r:*") as tar:
            for m in tar:
                _check_member(m, tar_path)
                members.append(m)
                if m.isfile():
                    # Read the payload now: a truncated archive fails here, before extraction.
                    f = tar.extractfile(m)
                    while f is not None and f.read(8 * 2**20):
                        pass
    except IntegrityError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        first = str(e).splitlines()[0].rstrip(":") if str(e) else ""  # tarfile lists every method tried
        raise IntegrityError(
            f"{tar_path} is truncated or not a valid tar.gz ({type(e).__name__}: {first})",
            "Re-download or re-pack the bundle",
        ) from None
    if not members:
        raise IntegrityError(f"{tar_path} is empty", "Re-pack the bundle")
    tops = {PurePosixPath(m.name).parts[0] for m in members}
    if len(tops) != 1:
        raise IntegrityError(
            f"{tar_path} has {len(tops)} top-level entries ({', '.join(sorted(tops)[:3])})",
            "A bundle tarball holds exactly one directory",
        )
    top = tops.pop()
    if any(m.name == top and not m.isdir() for m in members):
        raise IntegrityError(f"{tar_path}: top-level entry '{top}' is not a directory", "Re-pack the bundle")
    return top, members


def _check_member(m: tarfile.TarInfo, tar_path: Path) -> None:
    name = m.name
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise IntegrityError(f"{tar_path}: member '{name}' has an absolute path", "Do not extract this archive")
    if ".." in parts or "\\" in name or "\x00" in name:
        raise IntegrityError(f"{tar_path}: member '{name}' escapes the destination", "Do not extract this archive")
    if m.issym() or m.islnk():
        raise IntegrityError(
            f"{tar_path}: member '{name}' is a link (to '{m.linkname}')", "Bundles hold regular files only"
        )
    if not (m.isfile() or m.isdir()):
        raise IntegrityError(
            f"{tar_path}: member '{name}' is a device, FIFO or special file", "Do not extract this archive"
        )


def extract_safely(tar_path: Path, dest: Path) -> Path:
    """Check every member, then extract into `dest` (created, must not exist or be empty).
    Returns the extracted bundle directory. Nothing is written if a check fails."""
    top, members = check_members(tar_path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path, mode="r:*") as tar:
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                with open(target, "wb") as out:
                    shutil.copyfileobj(src if src is not None else io.BytesIO(), out)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise IntegrityError(f"{tar_path} changed or failed while extracting ({e})", "Re-download the bundle") from None
    return dest / top
