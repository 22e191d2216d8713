"""Bad input, as users type it: every case runs the real `edgekit` console script and must end
with one line on stderr naming the problem (no traceback), its documented exit code, and
nothing written: no output directory, no tarball, no temp leftovers, no bundle modified."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reliability import record

from edgekit.targets import targets_dir

pytestmark = pytest.mark.slow  # each case runs the console script against a real tiny GGUF export

EDGEKIT = str(Path(sys.executable).parent / "edgekit")
ROOT = Path(__file__).resolve().parent.parent


def _ckpt(tiny_phi3: Path, tmp: Path, mutate=None) -> Path:
    d = tmp / "ckpt"
    shutil.copytree(tiny_phi3, d)
    if mutate:
        mutate(d)
    return d


def _config(d: Path, **changes) -> None:
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def _truncate(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _lying_header(d: Path) -> None:
    import struct

    p = d / "model.safetensors"
    data = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, end + 10**9]  # claims a gigabyte the file does not have
    raw = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _no_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer.model"):
        (d / name).unlink(missing_ok=True)


def _targets(tmp: Path, edit) -> Path:
    t = tmp / "targets"
    shutil.copytree(targets_dir(), t)
    edit(t)
    return t


def _bundle(tiny_gguf: Path, tmp: Path, damage=None) -> Path:
    b = tmp / "bundle"
    shutil.copytree(tiny_gguf, b)
    if damage:
        damage(b)
    return b


def _schema(b: Path) -> None:
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))


def _corrupt(b: Path) -> None:
    data = bytearray((b / "model.gguf").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.gguf").write_bytes(bytes(data))


def _tarball(tiny_gguf: Path, tmp: Path, cut: bool) -> Path:
    from edgekit.tarball import pack

    t = tmp / "bundle.tar.gz"
    pack(tiny_gguf, t)
    if cut:
        t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    return t


def _evil_tar(tmp: Path) -> Path:
    import io
    import tarfile

    t = tmp / "evil.tar.gz"
    with tarfile.open(t, "w:gz") as tar:
        info = tarfile.TarInfo("b/../../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return t


def _text(tmp: Path, text: str) -> Path:
    p = tmp / "eval.txt"
    p.write_text(text)
    return p


def _toml(tmp: Path, text: str) -> Path:
    p = tmp / "edgekit.toml"
    p.write_text(text)
    return p


def _readonly(tmp: Path) -> Path:
    d = tmp / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        # Root ignores mode bits: a read-only mount is what really refuses a write.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], check=True)
    else:
        d.chmod(0o555)
    return d


# (case id, category, build args from fixtures, exit code, substring of the one-line message)
CASES = [
    ("missing path", "checkpoint", lambda f: ["export", f.tmp / "missing", "--out", f.out], 2, "no such directory"),
    (
        "file instead of a directory",
        "checkpoint",
        lambda f: ["export", f.ckpt(lambda d: None) / "config.json", "--out", f.out],
        2,
        "is a file, not a checkpoint directory",
    ),
    (
        "directory without config.json",
        "checkpoint",
        lambda f: ["export", f.ckpt(lambda d: (d / "config.json").unlink()), "--out", f.out],
        2,
        "has no config.json",
    ),
    (
        "malformed config.json",
        "checkpoint",
        lambda f: ["export", f.ckpt(lambda d: (d / "config.json").write_text("{not json")), "--out", f.out],
        2,
        "is not valid JSON",
    ),
    (
        "unsupported architecture",
        "checkpoint",
        lambda f: ["export", f.ckpt(lambda d: _config(d, architectures=["FooForCausalLM"])), "--out", f.out],
        2,
        "Supported: ",
    ),
    (
        "truncated model.safetensors",
        "checkpoint",
        lambda f: ["export", f.ckpt(_truncate), "--out", f.out],
        2,
        "model.safetensors is truncated",
    ),
    (
        "safetensors header lying about sizes",
        "checkpoint",
        lambda f: ["export", f.ckpt(_lying_header), "--out", f.out],
        2,
        "is truncated: its header needs",
    ),
    (
        "missing tokenizer",
        "checkpoint",
        lambda f: ["export", f.ckpt(_no_tokenizer), "--out", f.out],
        2,
        "has no tokenizer",
    ),
    (
        "tokenizer larger than the vocabulary",
        "checkpoint",
        lambda f: ["export", f.ckpt(lambda d: _config(d, vocab_size=100)), "--out", f.out],
        2,
        "vocab",
    ),
    (
        "pickle-only weights without --allow-pickle",
        "hostile",
        lambda f: [
            "export",
            f.ckpt(lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin")),
            "--out",
            f.out,
        ],
        2,
        "--allow-pickle",
    ),
    (
        "config that needs remote code",
        "hostile",
        lambda f: ["export", f.ckpt(lambda d: _config(d, auto_map={"AutoModelForCausalLM": "m.M"})), "--out", f.out],
        2,
        "--trust-remote-code",
    ),
    (
        "unknown target",
        "names",
        lambda f: ["export", f.tiny, "--target", "tflite", "--out", f.out],
        2,
        "unknown target 'tflite'",
    ),
    ("unknown profile", "names", lambda f: ["bench", f.bundle(), "--profile", "watch"], 2, "unknown profile 'watch'"),
    ("unknown alias", "names", lambda f: ["export", "phi9-mega", "--out", f.out], 2, "not a directory, a hub id"),
    (
        "uncached hub id with --offline",
        "names",
        lambda f: ["export", "some-org/never-cached", "--offline", "--out", f.out],
        2,
        "local",
    ),
    (
        "unknown recipe key",
        "names",
        lambda f: ["export", f.tiny, "--set", "bits=3", "--out", f.out],
        2,
        "unknown key 'bits'",
    ),
    (
        "malformed targets/*.toml",
        "config",
        lambda f: f.env_targets(lambda t: (t / "gguf-q4_k_m.toml").write_text("[format\n"), ["targets"]),
        2,
        "malformed TOML",
    ),
    (
        "unknown key in targets/*.toml",
        "config",
        lambda f: f.env_targets(
            lambda t: (t / "onnx-int4.toml").write_text((t / "onnx-int4.toml").read_text() + "\n[extras]\n"),
            ["targets"],
        ),
        2,
        "unknown key 'extras'",
    ),
    (
        "unknown key in a profile",
        "config",
        lambda f: f.env_targets(
            lambda t: (t / "profiles.toml").write_text(
                (t / "profiles.toml").read_text() + "\n[profiles.x]\ncores = 2\n"
            ),
            ["targets"],
        ),
        2,
        "unknown key 'cores'",
    ),
    (
        "malformed edgekit.toml",
        "config",
        lambda f: ["build", "--config", _toml(f.tmp, "[build\n"), "--out", f.out],
        2,
        "malformed TOML",
    ),
    (
        "unknown key in edgekit.toml",
        "config",
        lambda f: ["build", "--config", _toml(f.tmp, '[[model]]\nsource = "x"\nquantize = 4\n'), "--out", f.out],
        2,
        "edgekit.toml:3: unknown key 'quantize'",
    ),
    (
        "--out in a read-only directory",
        "output",
        lambda f: ["export", f.tiny, "--out", _readonly(f.tmp) / "b"],
        2,
        "cannot write to",
    ),
    ("--out exists and is not empty", "output", lambda f: ["export", f.tiny, "--out", f.nonempty()], 2, "--force"),
    ("not a bundle", "bundle", lambda f: ["run", f.tmp, "--prompt", "hi"], 2, "not an edgekit bundle"),
    (
        "manifest with a wrong schema version",
        "bundle",
        lambda f: ["run", f.bundle(_schema), "--prompt", "hi"],
        4,
        "schema_version",
    ),
    (
        "corrupted model file in a bundle",
        "bundle",
        lambda f: ["run", f.bundle(_corrupt), "--prompt", "hi"],
        4,
        "'model.gguf' does not match its sha256",
    ),
    ("truncated tarball", "bundle", lambda f: ["validate", _tarball(f.tiny_gguf, f.tmp, cut=True)], 4, "truncated"),
    (
        "tarball with a path escaping the destination",
        "hostile",
        lambda f: ["validate", _evil_tar(f.tmp)],
        4,
        "escapes the destination",
    ),
    ("empty eval text", "verify", lambda f: ["verify", f.bundle(), "--eval-text", _text(f.tmp, "")], 2, "empty"),
    (
        "eval text shorter than two tokens",
        "verify",
        lambda f: ["verify", f.bundle(), "--eval-text", _text(f.tmp, "a")],
        2,
        "token",
    ),
    ("--reps 0", "bench", lambda f: ["bench", f.bundle(), "--reps", "0"], 2, "--reps"),
    (
        "prompt longer than the context",
        "bench",
        lambda f: ["bench", f.bundle(), "--prompt-tokens", "100000"],
        2,
        "context",
    ),
    (
        "--shard out of range",
        "config",
        lambda f: ["build", "--shard", "3/2", "--out", f.out],
        2,
        "K must be between 1 and N",
    ),
]


class Fixtures:
    def __init__(self, tmp: Path, tiny: Path, tiny_gguf: Path):
        self.tmp, self.tiny, self.tiny_gguf = tmp, tiny, tiny_gguf
        self.out = tmp / "out"
        self.env: dict[str, str] = {}
        self.watched: list[Path] = []

    def ckpt(self, mutate):
        return _ckpt(self.tiny, self.tmp, mutate)

    def bundle(self, damage=None):
        b = _bundle(self.tiny_gguf, self.tmp, damage)
        self.watched.append(b)
        return b

    def nonempty(self):
        self.out.mkdir()
        (self.out / "keep.txt").write_text("mine")
        return self.out

    def env_targets(self, edit, _):
        self.env["EDGEKIT_TARGETS_DIR"] = str(_targets(self.tmp, edit))
        return ["export", self.tiny, "--target", "gguf-q4_k_m", "--out", self.out]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, tiny_phi3, tiny_gguf):
    name, category, make_args, code, expect = case
    f = Fixtures(tmp_path, tiny_phi3, tiny_gguf)
    args = [str(a) for a in make_args(f)]
    before = {str(b): _snapshot(b) for b in f.watched}
    out_existed = f.out.exists()
    try:
        r = subprocess.run(
            [EDGEKIT, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **f.env}, cwd=tmp_path
        )
    finally:
        for m in tmp_path.glob("ro"):
            subprocess.run(["umount", str(m)], capture_output=True)
    lines = r.stderr.strip().splitlines()
    ok_line = len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    written = [] if out_existed else [p for p in [f.out] if p.exists()]
    written += [p for p in tmp_path.rglob("*") if ".edgekit-tmp-" in p.name]
    written += [p for p in tmp_path.rglob("*.tar.gz") if p.name not in ("bundle.tar.gz", "evil.tar.gz")]
    changed = [b for b, snap in before.items() if _snapshot(Path(b)) != snap]
    if out_existed:
        assert sorted(p.name for p in f.out.iterdir()) == ["keep.txt"]
    record(
        "bad input",
        category,
        name,
        f"exit {r.returncode}",
        passed=r.returncode == code and ok_line and expect in r.stderr and not written and not changed,
        half_written=len(written) + len(changed),
    )
    assert r.returncode == code, r.stderr
    assert ok_line, r.stderr
    assert expect in lines[0], lines[0]
    assert not written and not changed, (written, changed)
    assert not Path("/tmp/escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
