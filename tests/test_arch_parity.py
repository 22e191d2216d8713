"""Architecture parity: every Phi fixture, exported unquantized, computes what transformers does.

Unquantized (onnx-int4 precision=fp32, gguf intermediate=f32 quant_type=F32) so that any difference is the
converter's or the runtime's, not 4-bit rounding. Short text: the built-in eval text; LongRoPE
fixtures also go through verify's long-context probe (a prompt ending 64 tokens before 4096,
then one token at a time to 4352).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit import api
from edgekit.longcontext import ProbePlan, boundary_of, forced_boundary, parity_context
from edgekit.tiny import FAMILIES, make_tiny, runtime_shape_problems

KLD_MAX = 1e-3
TOP1_MIN = 0.99
STRICT = {
    "kld_mean_max": KLD_MAX,
    "top1_agreement_min": TOP1_MIN,
    # Tokenizers are checked elsewhere (the tiny SentencePiece vocabulary splits space runs
    # differently in the runtimes); this file is about the graph.
    "tokenizer_agreement_min": 0.0,
}
UNQUANTIZED = {"onnx-int4": {"precision": "fp32"}, "gguf-q4_k_m": {"intermediate": "f32", "quant_type": "F32"}}

# (family, format): every Phi variant edgekit.tiny builds, in both formats where the format
# claims the architecture (Phi-3.5-MoE's ONNX export is CUDA-only in the genai builder).
CELLS = [
    (f, fmt)
    for f in ("phi3", "phi3-longrope", "phi4-mini", "phi3-medium", "phimoe")
    for fmt in UNQUANTIZED
    if not (f == "phimoe" and fmt == "onnx-int4")
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    return {f: make_tiny(f, root / f) for f in {f for f, _ in CELLS}}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return tmp_path_factory.mktemp("phi-bundles")


def _export_verify(ckpt, fmt, out, **recipe):
    [res] = api.export(str(ckpt), fmt, out, force=True, recipe={**UNQUANTIZED[fmt], **recipe})
    return res, api.verify(res.bundle, thresholds=STRICT)


@pytest.mark.slow
@pytest.mark.parametrize("family, fmt", CELLS, ids=[f"{f}-{fmt}" for f, fmt in CELLS])
def test_phi_fixture_matches_transformers(family, fmt, ckpts, bundles):
    res, rep = _export_verify(ckpts[family], fmt, bundles / f"{family}-{fmt}")
    if family == "phimoe":
        # A named llama.cpp limit (gguf_q4km.KNOWN_DIFFERENCES): the gate fails and says why.
        assert rep.kld_mean > KLD_MAX and not rep.passed
        assert any("RMSNorm where transformers' PhiMoE uses LayerNorm" in f for f in rep.failed)
        assert any("known difference from transformers" in n for n in res.notes)
        return
    assert rep.kld_mean <= KLD_MAX, rep.kld_mean
    assert rep.top1_agreement >= TOP1_MIN, rep.top1_agreement
    config = json.loads((ckpts[family] / "config.json").read_text())
    lc = rep.long_context
    if boundary_of(config) is None:
        assert lc is None
        assert rep.passed, rep.failed
        return
    assert lc is not None and lc.boundary == 4096 and lc.prompt_tokens < 4096
    parity = json.loads((bundles / f"{family}-{fmt}" / "parity.json").read_text())
    assert parity["long_context"]["positions"] == lc.positions
    manifest = json.loads((bundles / f"{family}-{fmt}" / "manifest.json").read_text())
    assert manifest["parity"]["long_context"]["parity_context"] == lc.parity_context
    if fmt == "onnx-int4":
        # Capped at the switch by default: the bundle cannot be run where the runtime leaves
        # transformers, and everything it can run matches.
        assert manifest["quantization"]["context_length"] == 4096
        assert lc.bundle_context == 4096 and lc.positions_after == 0 and lc.parity_context == 4096
        assert lc.kld_mean <= KLD_MAX and lc.passed and rep.passed, rep.failed
    else:
        # llama.cpp with n_ctx sized for the text: the long factors everywhere, so past the
        # boundary it matches; before it is the documented llama.cpp limit.
        assert lc.positions_after == 256
        assert lc.kld_mean_after <= KLD_MAX and lc.top1_after >= TOP1_MIN
        assert lc.passed and rep.passed, rep.failed
        assert lc.parity_context == lc.total_tokens - 1
        assert lc.kld_mean_before > KLD_MAX and "long factors at every position" in lc.limit


@pytest.mark.slow
def test_lifting_the_onnx_cap_fails_the_long_context_gate_with_the_runtime_named(ckpts, bundles, capsys):
    res, rep = _export_verify(ckpts["phi3-longrope"], "onnx-int4", bundles / "uncapped", context_length=131072)
    lc = rep.long_context
    assert lc.positions_after == 256 and lc.bundle_context is None
    assert lc.kld_mean_before <= KLD_MAX  # the runtime is right up to the switch...
    assert lc.kld_mean_after > 0.1  # ...and leaves transformers after it
    assert lc.parity_context == 4096
    assert not lc.passed and not rep.passed
    assert any("short factors" in f for f in rep.failed)
    names = {c.name for c in rep.checks if not c.passed}
    assert {"long_context_kld_mean", "long_context_top1"} <= names
    manifest = json.loads((bundles / "uncapped" / "manifest.json").read_text())
    assert any("past LongRoPE's switch" in n for n in manifest["export"]["notes"])


@pytest.mark.slow
def test_no_long_context_skips_the_probe(ckpts, bundles):
    [res] = api.export(
        str(ckpts["phi3-longrope"]), "gguf-q4_k_m", bundles / "skip", force=True, recipe=UNQUANTIZED["gguf-q4_k_m"]
    )
    rep = api.verify(res.bundle, thresholds=STRICT, long_context=False)
    assert rep.long_context is None
    assert "long_context" not in json.loads((bundles / "skip" / "manifest.json").read_text())["parity"]


@pytest.mark.slow
def test_long_reference_is_each_prefix_forward(ckpts):
    """The probe's reference at position p equals transformers' forward over ids[:p+1]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekit.checkpoint import resolve
    from edgekit.reference import default_eval_text, long_reference, probe_ids

    path = ckpts["phi3-longrope"]
    plan = ProbePlan.at(4096)
    tok = AutoTokenizer.from_pretrained(path)
    ids = probe_ids(tok, default_eval_text(), plan.total_tokens)
    ref = long_reference(resolve(str(path)), ids, plan.prompt_tokens, plan.boundary)
    assert ref.shape[0] == plan.positions
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in (plan.prompt_tokens - 1, 4095, 4096, plan.total_tokens - 2):
        with torch.inference_mode():
            want = model(torch.tensor([ids[: p + 1]]), logits_to_keep=1).logits[0, -1].numpy()
        np.testing.assert_allclose(ref[p - (plan.prompt_tokens - 1)], want, rtol=1e-4, atol=1e-4)


# --- fast: plans and tables -------------------------------------------------------------------


def test_boundary_of_configs():
    assert (
        boundary_of(
            {
                "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096,
                "rope_scaling": {"type": "longrope"},
            }
        )
        == 4096
    )
    assert boundary_of({"max_position_embeddings": 4096, "original_max_position_embeddings": 4096}) is None
    assert boundary_of({"max_position_embeddings": 8192}) is None  # SmolLM2
    # Llama 3.2: the original context lives in rope_scaling.
    assert (
        boundary_of(
            {
                "max_position_embeddings": 131072,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192},
            }
        )
        == 8192
    )
    assert forced_boundary({"max_position_embeddings": 8192}) == 4096
    assert forced_boundary({"max_position_embeddings": 2048}) == 1024


def test_probe_plan_crosses_the_boundary():
    plan = ProbePlan.at(4096)
    assert plan.prompt_tokens < 4096 < plan.total_tokens
    assert plan.positions == plan.total_tokens - plan.prompt_tokens == 64 + 256 + 1


def test_parity_context_ignores_a_lone_spike_and_finds_a_drift():
    k = np.full(100, 1e-4)
    k[10] = 5.0  # one noisy position (mean of its block stays low)
    assert parity_context(k, 4000, 0.5) == 4100
    k[60:] = 2.0  # drift from position 4060 on
    assert parity_context(k, 4000, 0.5) == 4060


def test_every_tiny_family_respects_runtime_shapes():
    from edgekit.tiny import TINY

    for fam in FAMILIES.values():
        if fam.unbuildable:
            continue
        settings = {**TINY, **fam.config}
        settings.setdefault("vocab_size", 49152 + 11)  # byte-level families: SmolLM2's vocabulary
        assert runtime_shape_problems(settings) == [], fam.name


def test_shape_check_catches_what_the_runtimes_refuse():
    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    assert runtime_shape_problems(base) == []
    assert any("lm_head" in p for p in runtime_shape_problems({**base, "intermediate_size": 256}))
    assert any("multiple of 16" in p for p in runtime_shape_problems({**base, "hidden_size": 96}))
    assert any(
        "multiple of 8" in p
        for p in runtime_shape_problems({**base, "hidden_size": 256, "partial_rotary_factor": 0.375})
    )


@pytest.mark.slow
def test_a_width_the_builder_mistakes_for_the_lm_head_is_routed_to_optimum(tmp_path, monkeypatch):
    """The genai builder writes any Linear with vocab_size outputs as an lm_head; edgekit routes
    such a checkpoint to the optimum exporter instead of shipping that graph."""
    import dataclasses

    from edgekit import tiny

    fam = dataclasses.replace(
        FAMILIES["phi4-mini"],
        name="phi4-clash",
        tokenizer="phi3",
        config={**FAMILIES["phi4-mini"].config, "vocab_size": 512, "intermediate_size": 384},
    )
    monkeypatch.setattr(tiny, "runtime_shape_problems", lambda settings: [])
    (tmp_path / "ckpt").mkdir()
    tiny.build(fam, tmp_path / "ckpt", 0)  # qkv_proj: (4 + 2 x 2) x 64 = 512 outputs
    res, rep = _export_verify(tmp_path / "ckpt", "onnx-int4", tmp_path / "b")
    assert res.path_taken == "optimum+MatMulNBits"
    assert any("qkv_proj has as many outputs as the vocabulary" in n for n in res.notes)
    assert rep.kld_mean <= KLD_MAX and rep.top1_agreement >= TOP1_MIN


@pytest.mark.slow
def test_bench_notes_a_context_past_longropes_switch_in_llama_cpp(ckpts, bundles):
    from edgekit.formats.gguf_q4km import session as gguf_q4km

    [res] = api.export(
        str(ckpts["phi3-longrope"]), "gguf-q4_k_m", bundles / "note", force=True, recipe=UNQUANTIZED["gguf-q4_k_m"]
    )
    model = bundles / "note" / gguf_q4km.MODEL_FILE
    assert gguf_q4km.longrope_context_note(model, 4096) is None
    assert "long factors at every position" in gguf_q4km.longrope_context_note(model, 8192)
    [plain] = api.export(
        str(ckpts["phi3"]), "gguf-q4_k_m", bundles / "note-4k", force=True, recipe=UNQUANTIZED["gguf-q4_k_m"]
    )
    assert gguf_q4km.longrope_context_note(bundles / "note-4k" / gguf_q4km.MODEL_FILE, 8192) is None
