"""edgekit installs as a package: a wheel built from the repo, installed into a fresh venv,
answers `edgekit targets` and exports a tiny model with nothing from the checkout on its path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from edgekit.targets import USER_DIR_ENV, load_targets

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the edgekit wheel installed. Its dependencies (torch, the runtimes)
    come from this venv's site-packages through a .pth line, which adds that directory only:
    the editable install's hook there is not run, so `import edgekit` must find the wheel."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    [wheel] = wheels.glob("edgekit-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "edgekit-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", USER_DIR_ENV)}
    return subprocess.run([str(venv / "bin" / "edgekit"), *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_installed_wheel_lists_the_shipped_targets(installed, tmp_path):
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import edgekit; print(edgekit.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(installed) in where and str(ROOT) not in where
    out = _run(installed, "targets", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc["formats"]) == set(load_targets().formats)
    assert "laptop-cpu" in doc["profiles"]


@pytest.mark.slow
def test_installed_wheel_exports_a_tiny_model(installed, tiny_phi3, tmp_path):
    out = _run(
        installed,
        "export",
        str(tiny_phi3),
        "--target",
        "gguf-q4_k_m",
        "--no-verify",
        "-q",
        "--out",
        str(tmp_path / "bundle"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    check = _run(installed, "validate", str(tmp_path / "bundle"), cwd=tmp_path)
    assert check.returncode == 0, check.stderr


def test_user_targets_dir_lies_on_top(tmp_path, monkeypatch):
    """A user's profiles add to (or replace by name) the shipped ones; a format file of theirs
    replaces the shipped file of that name."""
    (tmp_path / "profiles.toml").write_text('[profiles.my-phone]\nformats = ["onnx-int4"]\nthreads = 4\n')
    shipped = (Path(load_targets().formats["gguf-q4_k_m"].source)).read_text()
    (tmp_path / "gguf-q4_k_m.toml").write_text(shipped.replace('imatrix = "calibration"', 'imatrix = "none"'))
    monkeypatch.setenv(USER_DIR_ENV, str(tmp_path))
    t = load_targets()
    assert {"laptop-cpu", "mobile-onnx", "my-phone"} <= set(t.profiles)
    assert t.formats["gguf-q4_k_m"].recipe["imatrix"] == "none"
    assert (
        t.formats["onnx-int4"].recipe
        == load_targets(Path(t.formats["onnx-int4"].source).parent).formats["onnx-int4"].recipe
    )


def test_targets_dir_option_and_a_missing_one(tmp_path):
    from click.testing import CliRunner

    from edgekit.cli import cli

    (tmp_path / "profiles.toml").write_text('[profiles.my-phone]\nformats = ["onnx-int4"]\nthreads = 4\n')
    res = CliRunner().invoke(cli, ["--targets-dir", str(tmp_path), "targets", "--json"], env={USER_DIR_ENV: None})
    assert res.exit_code == 0 and "my-phone" in json.loads(res.stdout)["profiles"]
    os.environ.pop(USER_DIR_ENV, None)
    res = CliRunner().invoke(cli, ["--targets-dir", str(tmp_path / "nope"), "targets"])
    os.environ.pop(USER_DIR_ENV, None)
    assert res.exit_code == 2 and "targets directory not found" in res.output
