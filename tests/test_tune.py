"""edgekit export --tune: every candidate exported and verified, the smallest passing one kept."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgekit import api
from edgekit.bundle import validate
from edgekit.cli import cli
from edgekit.errors import GateFailed
from edgekit.targets import load_targets

pytestmark = pytest.mark.slow  # exports and verifies every tune candidate

# A random 64-wide model is far from its reference at 4-5 bits: loose limits let every
# candidate pass, so the choice is decided by size alone.
LOOSE = {"kld_mean_max": 100.0, "top1_agreement_min": 0.0, "ppl_ratio_max": 100.0, "tokenizer_agreement_min": 0.0}


def test_tune_keeps_the_smallest_passing_candidate(tiny_phi3, tmp_path):
    dest = tmp_path / "tuned"
    [res] = api.export(str(tiny_phi3), "gguf-q4_k_m", dest, tune=True, thresholds=LOOSE)
    assert res.bundle == str(dest)
    manifest = validate(dest)
    tried = manifest["tune"]["tried"]
    assert [t["name"] for t in tried] == [c["name"] for c in load_targets().format("gguf-q4_k_m").tune]
    assert all(t["passed"] for t in tried)
    smallest = min(t["size_bytes"] for t in tried)
    chosen = next(t for t in tried if t["name"] == manifest["tune"]["chosen"])
    assert chosen["size_bytes"] == smallest
    assert manifest["parity"]["passed"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned"]  # no work dirs left


def test_tune_with_no_passing_candidate_writes_nothing(tiny_phi3, tmp_path):
    impossible = {**LOOSE, "kld_mean_max": 0.0}
    with pytest.raises(GateFailed, match="no candidate passed"):
        api.export(str(tiny_phi3), "gguf-q4_k_m", tmp_path / "tuned", tune=True, thresholds=impossible)
    assert list(tmp_path.iterdir()) == []


def test_tune_needs_verify():
    result = CliRunner().invoke(cli, ["export", "x", "--tune", "--no-verify"])
    assert result.exit_code == 2 and "--tune" in result.stderr
