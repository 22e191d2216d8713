"""The static checks that are not ruff or mypy runs: public signatures are annotated (so the
type checker has something to check at module boundaries) and the CI workflows pass actionlint,
with shellcheck on their `run:` scripts. `make lint` runs ruff, mypy and actionlint itself."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgekit"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent  # actionlint and shellcheck install into the venv (requirements.txt)


def _public_defs(tree: ast.Module):
    """Module-level functions and the methods of module-level classes whose names are public."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    yield f"{node.name}.{item.name}", item


def _missing(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> list[str]:
    a = fn.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    if method and params and not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list):
        params = params[1:]  # self / cls
    missing = [p.arg for p in params if p.annotation is None]
    missing += [f"*{v.arg}" for v in (a.vararg, a.kwarg) if v is not None and v.annotation is None]
    if fn.returns is None:
        missing.append("return")
    return missing


def unannotated(root: Path = PACKAGE) -> list[str]:
    """'file:line name (missing: ...)' for every public function lacking an annotation."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for name, fn in _public_defs(tree):
            missing = _missing(fn, "." in name)
            if missing:
                found.append(f"{path.relative_to(root.parent)}:{fn.lineno} {name} (missing: {', '.join(missing)})")
    return found


def test_the_annotation_check_sees_what_is_missing(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "def ok(a: int, *, b: str = '') -> None: ...\n"
        "def bad(a, b: int): ...\n"
        "def _private(a): ...\n"
        "class C:\n"
        "    def method(self, x) -> int: ...\n"
        "    @staticmethod\n"
        "    def static(x: int) -> int: ...\n"
        "    def _hidden(self, y): ...\n",
        encoding="utf-8",
    )
    assert unannotated(pkg) == ["pkg/m.py:2 bad (missing: a, return)", "pkg/m.py:5 C.method (missing: x)"]


def test_public_functions_are_annotated():
    missing = unannotated()
    assert not missing, f"{len(missing)} public functions lack annotations:\n" + "\n".join(missing)


def _actionlint(*paths: Path) -> subprocess.CompletedProcess:
    exe = BIN / "actionlint"
    if not exe.exists():
        pytest.fail(f"actionlint not found at {exe}: run `make install` (requirements.txt pins it)")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(Path.home())}  # shellcheck from the venv, first
    return subprocess.run(
        [str(exe), "-shellcheck", shutil.which("shellcheck", path=env["PATH"]) or "", *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
    )


def test_workflows_pass_actionlint():
    assert WORKFLOWS, "no workflow under .github/workflows"
    r = _actionlint(*WORKFLOWS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    # The same linter on a workflow with a typo in a key, an unknown matrix value and an
    # unquoted variable in a script: each must be reported, or the check above proves nothing.
    wf = tmp_path / ".github" / "workflows" / "bad.yml"
    wf.parent.mkdir(parents=True)
    wf.write_text(
        "on: push\n"
        "jobs:\n"
        "  b:\n"
        "    runs-on: ubuntu-24.04\n"
        "    strategy:\n"
        "      matrix:\n"
        "        shard: [1, 2]\n"
        "    steps:\n"
        "      - run: echo ${{ matrix.shards }}\n"
        "      - run: X=$(ls); rm $X\n"
        "      - uses: actions/checkout@v4\n"
        "        with-args: {}\n",
        encoding="utf-8",
    )
    r = _actionlint(wf)
    assert r.returncode == 1
    assert "matrix.shards" in r.stdout and "SC2086" in r.stdout and "with-args" in r.stdout, r.stdout
