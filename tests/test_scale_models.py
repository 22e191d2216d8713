"""The scale benchmark's checkpoint writer (benchmarks/_scale_models.py): its tensor names and
shapes are transformers' own for every real shape, and what it writes loads in transformers
with the promised values, deterministically."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _scale_models as sm  # noqa: E402

# Tiny configs of both layouts (fused Phi-3, separate Llama); vocab past the tokenizer, as in
# the real Phi-3, so the padding rows are exercised.
TINY_PHI3 = sm.ScaleModel(
    "t-phi3",
    "tiny",
    "Phi3ForCausalLM",
    "phi3",
    "phi3",
    dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=640,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
)


def _meta_state(model: sm.ScaleModel, tmp_path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes transformers' own model class saves, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sm.write_config(
        model, tmp_path, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "generation_eos": [2]}
    )
    config = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    state = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if config.tie_word_embeddings:  # save_pretrained drops the tied copy
        state.pop("lm_head.weight")
    return state


@pytest.mark.parametrize("name", [n for n in sm.MODELS])
def test_layout_matches_transformers(name, tmp_path):
    model = sm.MODELS[name]
    ours = {s.name: s.shape for s in sm.tensor_layout(model)}
    assert ours == _meta_state(model, tmp_path)


@pytest.mark.parametrize(
    "name,billions",
    [("smollm2-135m", 0.135), ("llama-3.2-1b", 1.24), ("phi3-mini", 3.82), ("phi4-mini", 3.84), ("phi3-medium", 13.96)],
)
def test_parameter_counts_are_the_real_models(name, billions):
    # The published sizes (model cards): 135M, 1.24B, 3.82B, 3.84B, 14B (13.96B).
    assert sm.parameter_count(sm.MODELS[name]) / 1e9 == pytest.approx(billions, abs=0.01)


def test_sharding_bounds_every_shard():
    specs = sm.tensor_layout(sm.MODELS["phi3-medium"])
    shards = sm.shard(specs)
    assert [s.name for group in shards for s in group] == [s.name for s in specs]
    assert all(sum(s.nbytes for s in g) <= sm.SHARD_BYTES for g in shards)
    assert len(shards) == -(-sm.checkpoint_bytes(sm.MODELS["phi3-medium"]) // sm.SHARD_BYTES)


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_written_checkpoint_loads_in_transformers(tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = sm.write_checkpoint(TINY_PHI3, tmp_path / "ckpt", seed=3, shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sm.checkpoint_bytes(TINY_PHI3)

    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    for name, fname in index["weight_map"].items():
        with safe_open(out / fname, framework="pt") as f:
            assert torch.equal(f.get_tensor(name), state[name]), name
    norms = [t for n, t in state.items() if n.endswith("norm.weight")]
    assert norms and all(bool((t == 1).all()) for t in norms)
    weights = torch.cat([t.float().flatten() for n, t in state.items() if not n.endswith("norm.weight")])
    assert weights.mean().abs() < 1e-3 and weights.std() == pytest.approx(sm.STD, rel=0.02)

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) <= model.config.vocab_size  # padded rows past the tokenizer, as in Phi-3
    assert tok.chat_template and tok.eos_token_id == model.config.eos_token_id
    assert model(torch.tensor([tok.encode("The capital of France")])).logits.shape[-1] == 640


def test_writer_is_deterministic_and_sharding_independent(tmp_path):
    a = sm.write_checkpoint(TINY_PHI3, tmp_path / "a", seed=1, shard_bytes=100_000)
    b = sm.write_checkpoint(TINY_PHI3, tmp_path / "b", seed=1, shard_bytes=100_000)
    c = sm.write_checkpoint(TINY_PHI3, tmp_path / "c", seed=1)  # one shard
    d = sm.write_checkpoint(TINY_PHI3, tmp_path / "d", seed=2)
    assert _digests(a) == _digests(b)
    from safetensors import safe_open

    def tensor(path, name):
        fname = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
        with safe_open(path / fname, framework="pt") as f:
            return f.get_tensor(name)

    import torch

    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(tensor(a, name), tensor(c, name))
    assert not torch.equal(tensor(a, name), tensor(d, name))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(sm, "_write_shard", boom)
    with pytest.raises(OSError):
        sm.write_checkpoint(TINY_PHI3, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_watchdog_stops_a_tree_past_the_limit(tmp_path):
    """The memory watchdog kills the whole tree (here a grandchild holding 400 MiB) once the
    tree's RSS passes the limit, and the row says so; a step under the limit runs to the end."""
    import os
    import subprocess

    import scale

    hog = "import time; b = bytearray(400 * 2**20); time.sleep(60)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {hog!r}])"
    run = scale.run_watched(
        [sys.executable, "-c", parent], dict(os.environ), tmp_path / "hog.log", tmp_path, rss_limit=200 * 2**20
    )
    assert run["watchdog"] and run["returncode"] == -9 and run["wall_s"] < 30
    assert run["peak_rss_gib"] * 2**30 > 200 * 2**20
    ok = scale.run_watched(
        [sys.executable, "-c", "open('out.bin', 'wb').write(bytes(8 * 2**20))"],
        dict(os.environ),
        tmp_path / "ok.log",
        tmp_path,
        rss_limit=2**30,
    )
    assert not ok["watchdog"] and ok["returncode"] == 0 and ok["disk_growth_gib"] > 0
    assert subprocess.run(["pgrep", "-f", "bytearray\\(400"], capture_output=True).returncode == 1


def test_results_merge_by_model_step_tool():
    import scale

    doc = {"rows": []}
    for wall in (1, 2):
        doc = scale.merge_row(doc, {"model": "m", "step": "export-gguf", "tool": "raw", "wall_s": wall})
    doc = scale.merge_row(doc, {"model": "m", "step": "export-gguf", "tool": "edgekit", "wall_s": 3})
    assert sorted((r["tool"], r["wall_s"]) for r in doc["rows"]) == [("edgekit", 3), ("raw", 2)]


def test_recipe_variants_run_only_when_asked_and_render_beside_the_default(tmp_path, monkeypatch):
    """export-onnx-gptq / export-onnx-phone / bench-onnx-phone: not in a default run; their
    commands are the default export's with the variant's --set flags and their own output; the
    rendered table puts each under the default recipe's row, with the ratio to it."""
    import scale

    assert "export-onnx-gptq" not in scale.DEFAULT_STEPS and "export-onnx" in scale.DEFAULT_STEPS
    run = scale.ModelRun("smoke-llama", tmp_path, tmp_path, 19.0, 0)
    default, _ = run.command("export-onnx")
    gptq, _ = run.command("export-onnx-gptq")
    assert gptq[: default.index("--out") + 1] == default[: default.index("--out") + 1]
    assert gptq[gptq.index("--out") + 1].endswith("onnx-gptq") and "weight_search=gptq" in gptq
    phone, _ = run.command("export-onnx-phone")
    assert "mobile=true" in phone and phone[phone.index("--out") + 1].endswith("onnx-phone")
    _, stream_env = run.command("export-onnx-stream")
    assert stream_env["EDGEKIT_REFERENCE"] == "stream" and "EDGEKIT_REFERENCE" not in run.command("export-onnx")[1]
    bench, _ = run.command("bench-onnx-phone")
    assert bench[bench.index("--profile") + 1] == "mobile-onnx" and bench[2].endswith("onnx-phone")

    def row(tool, wall):
        return {
            "model": "phi3-mini",
            "step": "export-onnx",
            "tool": tool,
            "params": 3.82e9,
            "status": "ok",
            "wall_s": wall,
            "cpu_s": wall,
            "peak_rss_gib": 6.0,
            "checkpoint_gib": 7.1,
        }

    monkeypatch.setattr(scale, "DOC", tmp_path / "scale.md")
    text = scale.render({"rows": [row("edgekit", 100.0), row("edgekit gptq", 150.0)]})
    lines = [ln for ln in text.splitlines() if ln.startswith("| phi3-mini | 3.82B | export-onnx")]
    assert len(lines) == 2 and "gptq" in lines[1] and "`weight_search=gptq`" in lines[1]
    assert "1.50x wall" in lines[1]
