"""edgekit verify on real bundles: a float export matches, broken bundles fail the gate (exit 3)
and name the failed check, and the reference is computed once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit import api
from edgekit.bundle import read_manifest, write_manifest
from edgekit.cli import cli
from edgekit.errors import BadInput

pytestmark = pytest.mark.slow  # verifies real fp32 ONNX and GGUF exports


@pytest.fixture(scope="module")
def fp32_onnx(tiny_phi3, bundles_dir) -> Path:
    out = bundles_dir / "tiny-onnx-fp32"
    if not out.exists():
        api.export(str(tiny_phi3), "onnx-int4", out, recipe={"precision": "fp32"})
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / bundle.name
    shutil.copytree(bundle, dst)
    return dst


def _resign(bundle: Path) -> None:
    """Re-hash after a deliberate edit, so the damage reaches the parity check and not the
    integrity check."""
    write_manifest(bundle, read_manifest(bundle))


def _verify_cli(bundle: Path):
    return CliRunner().invoke(cli, ["verify", str(bundle), "--json", "-q"])


def test_fp32_export_matches_reference(fp32_onnx):
    rep = api.verify(fp32_onnx, write=False)
    assert rep.kld_mean < 1e-4
    assert rep.top1_agreement == 1.0
    assert rep.ppl_ratio == pytest.approx(1.0, abs=1e-3)
    assert rep.greedy_match_tokens_min == rep.greedy_tokens
    assert rep.chat_template_match is True
    # Known, real finding: onnxruntime-genai's tokenizer splits runs of spaces after a newline
    # differently from transformers for this SentencePiece (BPE) vocabulary; anything else
    # failing would be a regression.
    assert all("    " in f for f in rep.tokenizer_failures), rep.tokenizer_failures


def test_report_written_into_bundle_and_manifest(fp32_onnx, tmp_path):
    b = _copy(fp32_onnx, tmp_path)
    result = _verify_cli(b)
    assert result.exit_code in (0, 3), result.output
    doc = json.loads(result.stdout)["reports"][0]
    assert {
        "kld_mean",
        "kld_p99",
        "top1_agreement",
        "ppl_ref",
        "ppl_bundle",
        "ppl_ratio",
        "delta_p_mean",
        "delta_p_p1",
        "delta_p_p99",
        "greedy_match_tokens_mean",
        "greedy_match_tokens_min",
        "tokenizer_agreement",
        "chat_template_match",
        "passed",
        "checks",
    } <= set(doc)
    parity = json.loads((b / "parity.json").read_text())
    assert parity["kld_mean"] == doc["kld_mean"]
    manifest = read_manifest(b)
    assert manifest["parity"]["kld_mean"] == doc["kld_mean"]
    assert "parity.json" in {f["path"] for f in manifest["files"]}
    from edgekit.bundle import validate

    validate(b)  # still intact after the in-place update


def test_damaged_lm_head_fails_with_exit_3(fp32_onnx, tmp_path):
    import onnx
    from onnx import numpy_helper

    b = _copy(fp32_onnx, tmp_path)
    model = onnx.load(str(b / "model.onnx"))
    for init in model.graph.initializer:
        if init.name == "lm_head.MatMul.weight":
            w = numpy_helper.to_array(init)
            perm = np.random.default_rng(0).permutation(w.shape[1])
            init.CopyFrom(numpy_helper.from_array(w[:, perm].copy(), init.name))
            break
    else:
        pytest.fail("no lm_head initializer found")
    (b / "model.onnx.data").unlink()
    onnx.save_model(
        model,
        str(b / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    _resign(b)
    result = _verify_cli(b)
    assert result.exit_code == 3, result.output
    assert "kld_mean" in result.stderr and "top1_agreement" in result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("error:")]) == 1


def test_wrong_tokenizer_fails_with_exit_3(fp32_onnx, tmp_path):
    b = _copy(fp32_onnx, tmp_path)
    tj = json.loads((b / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, c = "▁the", "▁a"  # frequent pieces: swapping their ids changes almost every encoding
    vocab[a], vocab[c] = vocab[c], vocab[a]
    (b / "tokenizer.json").write_text(json.dumps(tj))
    _resign(b)
    result = _verify_cli(b)
    assert result.exit_code == 3
    assert "tokenizer_agreement" in result.stderr


def test_wrong_chat_template_fails_with_exit_3(fp32_onnx, tmp_path):
    b = _copy(fp32_onnx, tmp_path)
    cfg = json.loads((b / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("<|assistant|>", "<|user|>")
    (b / "tokenizer_config.json").write_text(json.dumps(cfg))
    (b / "chat_template.jinja").write_text(cfg["chat_template"])
    _resign(b)
    result = _verify_cli(b)
    assert result.exit_code == 3
    assert "chat_template_match" in result.stderr


def test_second_verify_uses_cached_reference(fp32_onnx, monkeypatch):
    api.verify(fp32_onnx, write=False)  # make sure the cache is filled

    def no_model(*a, **k):
        raise AssertionError("the reference model was loaded again")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    rep = api.verify(fp32_onnx, write=False)
    assert rep.reference["cached"] is True and rep.kld_mean < 1e-4


def test_gguf_bundle_verifies(tiny_gguf):
    rep = api.verify(tiny_gguf, write=False)
    # A random 64-wide model quantized to 4-5 bits is far from its reference; the figures must
    # still be finite and self-consistent.
    assert 0 < rep.kld_mean < 50 and 0 <= rep.top1_agreement <= 1
    assert rep.ppl_ratio == pytest.approx(rep.ppl_bundle / rep.ppl_ref)
    assert rep.chat_template_match is True


@pytest.mark.parametrize("text, expect", [("", "is empty"), ("   \n", "is empty"), ("a", "at least two tokens")])
def test_bad_eval_text(fp32_onnx, tmp_path, text, expect):
    f = tmp_path / "eval.txt"
    f.write_text(text)
    with pytest.raises(BadInput, match=expect):
        api.verify(fp32_onnx, eval_text=f, write=False)


def test_thresholds_override_and_typed(fp32_onnx):
    rep = api.verify(fp32_onnx, write=False, thresholds={"kld_mean_max": 0.0, "tokenizer_agreement_min": 0.0})
    assert not rep.passed and any(f.startswith("kld_mean") for f in rep.failed)
    with pytest.raises(BadInput, match="must be a number"):
        api.verify(fp32_onnx, write=False, thresholds={"kld_mean_max": "low"})


@pytest.mark.slow
def test_smollm2_gguf_passes_the_gate(smol_gguf):
    rep = api.verify(smol_gguf, write=False)
    assert rep.passed, rep.failed
    assert rep.tokenizer_agreement == 1.0 and rep.chat_template_match


@pytest.mark.slow
def test_smollm2_onnx_passes_and_meets_the_int4_goal_against_gguf(smol_onnx, smol_gguf):
    """Issue 14's goal as a regression test: default onnx-int4's mean KLD at most the default
    gguf-q4_k_m's, at no more than 1.1x its model size, both passing the gate. (This checkpoint
    sits on a Q4_1 grid that float block minimums store exactly: see benchmarks/recipes.py.)"""
    from edgekit.bundle import read_manifest

    onnx, gguf = api.verify(smol_onnx, write=False), api.verify(smol_gguf, write=False)
    assert onnx.passed, onnx.failed
    assert onnx.kld_mean <= gguf.kld_mean, (onnx.kld_mean, gguf.kld_mean)

    def model_bytes(bundle, names):
        return sum(f["size"] for f in read_manifest(bundle)["files"] if f["path"] in names)

    size_onnx = model_bytes(smol_onnx, {"model.onnx", "model.onnx.data", "genai_config.json"})
    assert size_onnx <= 1.1 * model_bytes(smol_gguf, {"model.gguf"})
