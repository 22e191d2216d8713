"""The layer contract: imports point one way (docs/architecture.md).

Every edgekit module's imports, at module level and inside functions, are parsed with `ast`
(no import runs). A module may import its own layer or a lower one; nothing imports `api` or
`cli` from inside the package; no module uses another module's private (_name) name; the
import graph has no cycle. Modules are matched by package prefix, so a module split into a
package (formats/onnx_int4.py -> formats/onnx_int4/) keeps its layer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "edgekit"
DOC = ROOT / "docs" / "architecture.md"

# (layer, module prefixes), lowest first. A module may import its own layer and the ones above it in this list.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # helpers with no knowledge of models or bundles: errors, where files go, progress, atomic
    # writes, the child-process protocol, the Gate record, signals, KEY=VALUE parsing, locks,
    # giving freed memory back to the OS
    (
        "utilities",
        ("errors", "paths", "progress", "fileio", "childjob", "gates", "signals", "overrides", "lock", "memory"),
    ),
    # what edgekit reads and writes: target files, checkpoints, bundles, tarballs, host facts,
    # measurements, metrics and scoring maths, task files, aliases, the cached test models
    (
        "data",
        (
            "targets",
            "checkpoint",
            "catalog",
            "bundle",
            "tarball",
            "host",
            "measure",
            "metrics",
            "scoring",
            "tasks",
            "longcontext",
            "embedded",
            "modelfile",
            "hftokenizer",
        ),
    ),
    # format backends and what they share: the transformers reference, the importance matrix (both
    # whole-model or block by block: layerwise),
    # llama.cpp's tools, the tiny random checkpoints (built with the format builders' help)
    ("formats", ("formats", "reference", "imatrix", "activations", "layerwise", "llamacpp_tools", "tiny", "tinytok")),
    # one service per stage, each owning its gate: export (+ its preflight and bundle README, which
    # ask the backends for their costs and templates), verify (parity), run, bench (plan, child,
    # records) + budgets, eval (and its child and records), select
    (
        "services",
        (
            "exporting",
            "preflight",
            "bundle_readme",
            "verification",
            "parity",
            "runbundle",
            "bench",
            "bench_plan",
            "bench_child",
            "budgets",
            "evaluate",
            "eval_child",
            "evalrecord",
            "select",
        ),
    ),
    # the whole flow for one model x format, written once
    ("pipeline", ("pipeline",)),
    # many flows: the build matrix, its child, its config, the summary both build and report use
    ("build", ("build", "buildchild", "buildconfig", "summary", "report")),
    # the library's one import: re-exports only
    ("api", ("api",)),
    # Click only
    ("cli", ("cli",)),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

# Crossings that live in files another branch owns, each to be removed by that branch.
KNOWN: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(mod: str) -> str | None:
    best = None
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (name, p)
    return best[0] if best else None


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py")) if p != PKG / "__init__.py"}


def imports(mod: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported edgekit module, name taken from it or "", line) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    known = modules()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("edgekit."):
                target = node.module[len("edgekit.") :]
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in known:  # from . import childjob: the module itself
                    out.append((sub, "", node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("edgekit."):
                    out.append((alias.name[len("edgekit.") :], "", node.lineno))
    return out


def private_attributes(path: Path, aliases: dict[str, str]) -> list[tuple[str, str, int]]:
    """module._name uses through an imported module's local name."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            out.append((aliases[node.value.id], node.attr, node.lineno))
    return out


def module_aliases(path: Path, mod: str) -> dict[str, str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    known = modules()
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                if sub in known:
                    out[alias.asname or alias.name] = sub
    return out


def violations() -> list[str]:
    bad = []
    for mod, path in modules().items():
        own = layer_of(mod)
        if own is None:
            bad.append(
                f"edgekit/{path.relative_to(PKG)}: module {mod} is in no layer; add it to LAYERS "
                "in tests/test_layers.py and to docs/architecture.md"
            )
            continue
        for target, name, line in imports(mod, path):
            where = f"edgekit/{path.relative_to(PKG)}:{line}"
            if target == "":  # from . import __version__: the package's version constant
                if name != "__version__":
                    bad.append(f"{where}: imports {name} from the package root; import it from its module")
                continue
            top = target.split(".")[0]
            if top in ("api", "cli") and not mod.startswith(top) and own not in ("api", "cli"):
                bad.append(f"{where}: {mod} imports edgekit.{target}; nothing inside the package imports api or cli")
                continue
            theirs = layer_of(target)
            if theirs is not None and RANK[theirs] > RANK[own]:
                bad.append(f"{where}: {mod} ({own}) imports edgekit.{target} ({theirs}), a higher layer")
            if (
                name.startswith("_")
                and not name.startswith("__")
                and target != mod
                and not target.startswith(mod + ".")
                and (mod.split(".")[0], f"{target}.{name}") not in KNOWN
            ):
                bad.append(f"{where}: {mod} uses the private name {target}.{name}; make it public or move it")
        for target, attr, line in private_attributes(path, module_aliases(path, mod)):
            if target != mod and (mod, f"{target}.{attr}") not in KNOWN:
                bad.append(f"edgekit/{path.relative_to(PKG)}:{line}: {mod} uses the private name {target}.{attr}")
    return bad


def test_every_import_points_down_and_nothing_private_crosses_modules():
    bad = violations()
    assert not bad, "layer contract broken:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    known = modules()
    for mod, path in known.items():
        deps = set()
        for target, _, _ in imports(mod, path):
            while target and target not in known:
                target = target.rpartition(".")[0]  # a name inside a module: its module
            if target and target != mod:
                deps.add(target)
        graph[mod] = deps
    # a package imports its own submodules (formats/__init__ -> formats.x registry) and they
    # import its protocol back; that is one unit, not a cycle between jobs
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                if not all(c.split(".")[0] == cycle[0].split(".")[0] for c in cycle):
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_architecture_doc_names_every_layer_and_module():
    text = DOC.read_text(encoding="utf-8")
    missing = [name for name, _ in LAYERS if name not in text]
    missing += [p for _, prefixes in LAYERS for p in prefixes if not re.search(rf"\b{re.escape(p)}\b", text)]
    assert not missing, f"docs/architecture.md does not mention: {', '.join(missing)}"


def test_the_contract_catches_an_upward_import(tmp_path):
    """The checker itself: a data module importing the pipeline is named as a violation."""
    fake = tmp_path / "edgekit"
    (fake / "formats").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "pipeline.py").write_text("X = 1\n")
    (fake / "bundle.py").write_text("def f():\n    from .pipeline import X\n    return X\n")
    (fake / "checkpoint.py").write_text("from .bundle import _hidden\n")
    globals()["PKG"] = fake
    try:
        bad = violations()
    finally:
        globals()["PKG"] = PKG_REAL
    assert any("bundle (data) imports edgekit.pipeline (pipeline)" in b for b in bad), bad
    assert any("private name bundle._hidden" in b for b in bad), bad


PKG_REAL = PKG
