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


def test_the_library_export_verifies_by_default_like_the_cli(tiny_phi3, tmp_path):
    """edgekit.export runs the same pipeline as `edgekit export`: parity is checked, written
    into the bundle and returned on the result; a failed gate is reported, not raised; and
    verify=False skips it."""
    [res] = api.export(str(tiny_phi3), "gguf-q4_k_m", tmp_path / "checked", thresholds=LOOSE)
    assert res.parity is not None and res.parity.passed
    assert (tmp_path / "checked" / "parity.json").is_file()
    assert validate(tmp_path / "checked")["parity"]["passed"] is True
    assert {g.kind for g in res.parity.checks} == {"parity"} and "parity" not in res.to_dict()
    strict = {**LOOSE, "kld_mean_max": 0.0}
    [bad] = api.export(str(tiny_phi3), "gguf-q4_k_m", tmp_path / "strict", thresholds=strict)
    assert not bad.parity.passed and bad.parity.failed[0].startswith("kld_mean ")
    with pytest.raises(GateFailed, match="parity gate failed"):
        api.parity_gate([bad.parity])
    [plain] = api.export(str(tiny_phi3), "gguf-q4_k_m", tmp_path / "plain", verify=False)
    assert plain.parity is None and not (tmp_path / "plain" / "parity.json").exists()
