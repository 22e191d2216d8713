"""Shared fixtures. No test may reach the network: the hub is switched off here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("EDGEKIT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "edgekit"))


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    from edgekit.tiny import make_tiny

    return make_tiny("phi3", tmp_path_factory.mktemp("ckpt") / "tiny-phi3")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from edgekit.embedded import ensure_checkpoint

    return ensure_checkpoint("smollm2-135m")


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


def _export(model: str, target: str, out: Path) -> Path:
    from edgekit import api

    if not (out / "manifest.json").exists():
        api.export(model, target, out, verify=False)  # only the bundle is needed; tests verify it themselves
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tiny_phi3, bundles_dir) -> Path:
    return _export(str(tiny_phi3), "gguf-q4_k_m", bundles_dir / "tiny-gguf")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_phi3, bundles_dir) -> Path:
    return _export(str(tiny_phi3), "onnx-int4", bundles_dir / "tiny-onnx")


@pytest.fixture(scope="session")
def smol_gguf(smollm2_dir, bundles_dir) -> Path:
    return _export("smollm2-135m", "gguf-q4_k_m", bundles_dir / "smol-gguf")


@pytest.fixture(scope="session")
def smol_onnx(smollm2_dir, bundles_dir) -> Path:
    return _export("smollm2-135m", "onnx-int4", bundles_dir / "smol-onnx")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Reliability records take their verdict from how the test ended (tests/reliability.py)."""
    from reliability import observe

    report = yield
    observe(item, call, report)
    return report


def pytest_sessionfinish(session, exitstatus):
    """After a full run (no file or -k selection), write docs/reliability.md from what the
    reliability tests recorded; EDGEKIT_RELIABILITY_DOC=1 forces it for a partial run."""
    from reliability import DOC, RECORDS, render

    full = session.config.args_source == pytest.Config.ArgsSource.TESTPATHS and not session.config.option.keyword
    if RECORDS and (full or os.environ.get("EDGEKIT_RELIABILITY_DOC") == "1"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(render(), encoding="utf-8")
