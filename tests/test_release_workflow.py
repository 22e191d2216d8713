"""The release workflow run here, step by step, as GitHub would run it: the `run:` scripts of
.github/workflows/release.yml's build (every matrix shard), merge and validate steps, taken from
the YAML and executed with the same shell, the same commands and the same shard flags. What is
substituted is only what GitHub provides: `${{ matrix.shard }}`, a fresh workspace per job (the
checkout holds a tiny edgekit.toml instead of the release matrix, so this runs in minutes), the
installed venv (`make install`), and artifacts moved between jobs the way upload/download-artifact
v4 move them (hidden files left out)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_build import CONFIG as TINY_MATRIX

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
VENV = Path(sys.executable).parent.parent  # what `make install` built
SHELL = ["bash", "-e"]  # GitHub's default `run:` shell on Linux when the workflow names none: bash -e {0}

# Every `run:` step of the workflow is either executed below or named here with the reason it is not.
NOT_RUN = {
    ("build", "Install"): "make install: the test runs inside the venv it built",
    (
        "build",
        "Previous release (baseline), if any",
    ): "gh release download: the test places baseline/summary.json itself",
    (
        "merge",
        "Install edgekit (no runtimes needed to merge)",
    ): "pip install -e .: the venv's console script is on PATH",
}
RUN = {("build", "Build shard ${{ matrix.shard }}/2"), ("merge", "Merge"), ("merge", "Validate every tarball")}

# The release matrix, shrunk: test_build's tiny matrix (one tiny random model in both formats, so
# two entries, one per shard; thresholds a random tiny model passes).
CONFIG = TINY_MATRIX


def _jobs() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))["jobs"]


def _step(job: str, name: str) -> dict:
    return next(s for s in _jobs()[job]["steps"] if s.get("name") == name)


def _script(step: dict, values: dict[str, str]) -> str:
    script = step["run"]
    for key, value in values.items():
        script = script.replace("${{ " + key + " }}", value)
    left = re.findall(r"\$\{\{.*?\}\}", script)
    assert not left, f"expression(s) GitHub would fill that the test does not: {left}"
    return script


def _run(script: str, workspace: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_WORKSPACE": str(workspace),
    }
    return subprocess.run([*SHELL, "-c", script], cwd=workspace, env=env, capture_output=True, text=True, timeout=1800)


def _checkout(workspace: Path, source: Path, *, installed: bool) -> Path:
    """A job's fresh checkout: the repository's edgekit.toml replaced by the tiny matrix; with
    `installed`, the .venv its Install step (`make install`) leaves in the workspace."""
    workspace.mkdir(parents=True)
    if installed:
        (workspace / ".venv").symlink_to(VENV, target_is_directory=True)
    (workspace / "edgekit.toml").write_text(CONFIG.format(src=source), encoding="utf-8")
    return workspace


def _artifact(src: Path, dest: Path) -> None:
    """upload-artifact@v4 `path: DIR` then download-artifact@v4 `pattern:`: DIR's contents land in
    ./<artifact name>/; hidden files and directories are not uploaded (include-hidden-files: false)."""
    shutil.copytree(src, dest, ignore=lambda _d, names: [n for n in names if n.startswith(".")])


def test_every_run_step_is_accounted_for():
    seen = {(job, s.get("name")) for job, spec in _jobs().items() for s in spec["steps"] if "run" in s}
    assert seen == RUN | set(NOT_RUN), seen ^ (RUN | set(NOT_RUN))


def test_matrix_and_shard_flags_agree():
    shards = _jobs()["build"]["strategy"]["matrix"]["shard"]
    script = _step("build", "Build shard ${{ matrix.shard }}/2")["run"]
    assert sorted(shards) == list(range(1, len(shards) + 1)), shards
    assert f'--shard "${{{{ matrix.shard }}}}/{len(shards)}"' in script, script
    merge = _step("merge", "Merge")["run"]
    assert all(f"--merge shard-{k}" in merge for k in shards), merge  # every shard's artifact is merged


@pytest.mark.slow
def test_release_workflow_build_merge_validate(tiny_phi3, tmp_path):
    jobs = _jobs()
    shards = [str(k) for k in jobs["build"]["strategy"]["matrix"]["shard"]]
    build = _step("build", "Build shard ${{ matrix.shard }}/2")
    built = {}
    for k in shards:  # one runner per shard: its own workspace
        ws = _checkout(tmp_path / f"build-{k}", tiny_phi3, installed=True)
        r = _run(_script(build, {"matrix.shard": k}), ws)
        assert r.returncode == 0, f"shard {k}: exit {r.returncode}\n{r.stderr[-3000:]}"
        built[k] = ws / f"shard-{k}"  # the upload-artifact path
        summary = json.loads((built[k] / "summary.json").read_text())
        assert summary["shard"] == f"{k}/{len(shards)}" and len(summary["entries"]) == 1, summary

    merge_ws = _checkout(tmp_path / "merge", tiny_phi3, installed=False)
    for k, out in built.items():
        _artifact(out, merge_ws / f"shard-{k}")
    r = _run(_script(_step("merge", "Merge"), {}), merge_ws)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(_script(_step("merge", "Validate every tarball"), {}), merge_ws)
    assert r.returncode == 0, r.stderr[-3000:]
    dist = merge_ws / "dist"
    tarballs = sorted(p.name for p in dist.glob("*.tar.gz"))
    assert tarballs == ["tiny-gguf-q4_k_m.tar.gz", "tiny-onnx-int4.tar.gz"], tarballs
    assert r.stderr.count("ok: dist/") == 2, r.stderr  # the glob reached validate as two paths

    # The release artifact's paths, exactly as the workflow lists them, each match a file.
    upload = next(s for s in jobs["merge"]["steps"] if s.get("with", {}).get("name") == "release")
    for pattern in upload["with"]["path"].split():
        assert list(merge_ws.glob(pattern)), f"release artifact path {pattern} matches nothing"
    merged = json.loads((dist / "summary.json").read_text())
    assert sorted(e["id"] for e in merged["entries"]) == ["tiny-gguf-q4_k_m", "tiny-onnx-int4"]
    assert merged["worst_exit_code"] == 0 and "incomplete" not in merged

    # Next release: shard 1 again with the previous release's summary.json where the baseline
    # step downloads it, so the script's `--baseline baseline` branch runs.
    ws = tmp_path / "build-1"
    (ws / "baseline").mkdir()
    shutil.copy(dist / "summary.json", ws / "baseline" / "summary.json")
    r = _run(_script(build, {"matrix.shard": shards[0]}), ws)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((ws / f"shard-{shards[0]}" / "summary.json").read_text())
    assert again["baseline"]["created_at"] == merged["created_at"], again.get("baseline")
    assert any(g["kind"] == "regression" for g in again["entries"][0]["gates"]), again["entries"][0]["gates"]
