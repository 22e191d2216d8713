"""The streamed (block by block) reference and importance matrix against the in-memory ones.

Every tiny family runs both ways through the public functions (build_reference, long_reference,
imatrix.load_or_compute), each with its own cache so neither reads the other's result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit.tiny import FAMILIES

FAMILIES_RUN = [name for name, fam in FAMILIES.items() if not fam.unbuildable]
PROMPTS = ("The capital of France is", "def add(a, b):")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from edgekit.tiny import make_tiny

    root = tmp_path_factory.mktemp("layerwise")
    return lambda family: make_tiny(family, root / family) if not (root / family).exists() else root / family


def both_modes(monkeypatch, tmp_path, compute):
    """compute() under EDGEKIT_REFERENCE=memory and =stream, each with an empty cache of its own."""
    out = {}
    for mode in ("memory", "stream"):
        monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / f"cache-{mode}"))
        monkeypatch.setenv("EDGEKIT_REFERENCE", mode)
        out[mode] = compute()
    return out["memory"], out["stream"]


def max_abs_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(a.logits(i)) - np.asarray(b.logits(i))).max()) for i in range(len(a.windows)))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES_RUN)
def test_streamed_reference_and_imatrix_equal_in_memory(family, tiny_dir, monkeypatch, tmp_path):
    from edgekit.checkpoint import resolve
    from edgekit.imatrix import load_or_compute
    from edgekit.reference import build_reference, default_eval_text, reference_info

    ck = resolve(str(tiny_dir(family)))
    mem, streamed = both_modes(
        monkeypatch, tmp_path, lambda: build_reference(ck, default_eval_text(), PROMPTS, 10, window=128)
    )
    assert (mem.mode, streamed.mode) == ("memory", "stream")
    assert not mem.cached and not streamed.cached
    assert mem.key == streamed.key and mem.dtype == streamed.dtype == "float32"
    assert len(mem.windows) > 1
    assert max_abs_diff(mem, streamed) <= 1e-5
    assert mem.greedy == streamed.greedy and all(len(v) > 0 for v in mem.greedy.values())
    assert reference_info(streamed)["mode"] == "stream"

    im_mem, im_str = both_modes(monkeypatch, tmp_path, lambda: load_or_compute(ck))
    assert im_mem.values.keys() == im_str.values.keys() and "lm_head" in im_str.values
    for name, v in im_mem.values.items():
        assert np.allclose(im_str.values[name], v, rtol=1e-5, atol=0), name
    assert im_str.tokens == im_mem.tokens and (im_mem.mode, im_str.mode) == ("memory", "stream")
    assert im_str.summary()["mode"] == "stream" and im_str.summary()["dtype"] == "float32"


@pytest.mark.slow
def test_streamed_cache_entry_records_its_mode(tiny_dir, monkeypatch, tmp_path):
    """A cached reference reports the mode it was computed in, whatever mode is asked now."""
    from edgekit.checkpoint import resolve
    from edgekit.reference import build_reference, default_eval_text

    ck = resolve(str(tiny_dir("llama")))
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    first = build_reference(ck, default_eval_text(), PROMPTS, 4, mode="stream")
    again = build_reference(ck, default_eval_text(), PROMPTS, 4, mode="memory")
    assert again.cached and again.mode == "stream" and again.key == first.key
    assert json.loads((first.directory / "meta.json").read_text())["mode"] == "stream"


@pytest.mark.slow
def test_streamed_long_context_reference(tiny_dir, monkeypatch, tmp_path):
    """Past LongRoPE's original context: the rotary factors switch per sequence as in memory."""
    from edgekit.checkpoint import resolve
    from edgekit.hftokenizer import load_tokenizer
    from edgekit.longcontext import ProbePlan, boundary_of
    from edgekit.reference import (
        default_eval_text,
        long_reference,
        probe_ids,
    )

    ck = resolve(str(tiny_dir("phi3-longrope")))
    boundary = boundary_of(ck.config)
    plan = ProbePlan.at(boundary)
    ids = probe_ids(load_tokenizer(ck.path), default_eval_text(), plan.total_tokens)
    mem, streamed = both_modes(
        monkeypatch, tmp_path, lambda: np.asarray(long_reference(ck, ids, plan.prompt_tokens, plan.boundary))
    )
    assert mem.shape == streamed.shape == (len(ids) - plan.prompt_tokens, ck.config["vocab_size"])
    assert float(np.abs(mem - streamed).max()) <= 1e-5


def to_bf16(src: Path, dst: Path) -> Path:
    """A copy of a tiny checkpoint stored in bfloat16, as most published checkpoints are."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16) for k, v in weights.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"}
    )
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.mark.slow
def test_bf16_checkpoint_computes_in_bf16_close_to_fp32(tiny_dir, monkeypatch, tmp_path):
    from edgekit.checkpoint import resolve
    from edgekit.imatrix import load_or_compute
    from edgekit.metrics import position_stats
    from edgekit.reference import build_reference, default_eval_text

    fp32 = resolve(str(tiny_dir("llama")))
    bf16 = resolve(str(to_bf16(fp32.path, tmp_path / "llama-bf16")))
    text = default_eval_text()
    monkeypatch.setenv("EDGEKIT_COMPUTE_DTYPE", "checkpoint")  # bf16 kernels even on a CPU without them
    mem, streamed = both_modes(monkeypatch, tmp_path, lambda: build_reference(bf16, text, PROMPTS, 8, window=128))
    assert mem.dtype == streamed.dtype == "bfloat16"
    assert mem.logits(0).dtype == np.float32  # stored upcast
    # The same bf16 kernels on the same shapes either way.
    assert max_abs_diff(mem, streamed) <= 1e-5
    assert mem.greedy == streamed.greedy

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache-fp32"))
    ref32 = build_reference(fp32, text, PROMPTS, 8, window=128)
    assert ref32.dtype == "float32" and ref32.key != streamed.key  # the dtype is in the cache key
    ref = np.concatenate([np.asarray(ref32.logits(i))[:-1] for i in range(len(ref32.windows))])
    got = np.concatenate([np.asarray(streamed.logits(i))[:-1] for i in range(len(ref32.windows))])
    targets = np.concatenate([np.asarray(w[1:]) for w in ref32.windows])
    stats = position_stats(ref, got, targets)
    # bf16 weights (rounded from the fp32 ones) and bf16 arithmetic: close, not equal.
    assert 0 < float(stats.kld.mean()) < 0.02
    assert float(stats.top1_same.mean()) > 0.9

    monkeypatch.setenv("EDGEKIT_REFERENCE", "stream")
    im = load_or_compute(bf16)
    assert im.dtype == "bfloat16" and im.mode == "stream"
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in im.values.values())


def test_mode_policy(tiny_dir, monkeypatch):
    from edgekit import layerwise
    from edgekit.errors import BadInput

    path = tiny_dir("llama")
    size = layerwise.weights_bytes(path, "float32")
    assert size == (path / "model.safetensors").stat().st_size - 8 - _header_len(path / "model.safetensors")
    assert layerwise.weights_bytes(path, "bfloat16") == size // 2
    monkeypatch.delenv("EDGEKIT_REFERENCE", raising=False)
    monkeypatch.setattr(layerwise, "available_bytes", lambda: int(size / layerwise.STREAM_SHARE) + 1)
    assert layerwise.mode_for(path, "float32") == "memory"
    monkeypatch.setattr(layerwise, "available_bytes", lambda: int(size / layerwise.STREAM_SHARE) - 1)
    assert layerwise.mode_for(path, "float32") == "stream"
    assert layerwise.mode_for(path, "float32", "memory") == "memory"  # the argument wins
    monkeypatch.setenv("EDGEKIT_REFERENCE", "memory")
    assert layerwise.mode_for(path, "float32") == "memory"
    monkeypatch.setenv("EDGEKIT_REFERENCE", "disk")
    with pytest.raises(BadInput, match="EDGEKIT_REFERENCE='disk'"):
        layerwise.mode_for(path, "float32")


def _header_len(file: Path) -> int:
    import struct

    with open(file, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


# --- memory ---------------------------------------------------------------------------------

HIDDEN, INTER, HEADS, KV_HEADS = 1024, 2816, 16, 4  # ~45 MB of fp32 weights per block


def write_random_llama(tokenizer_from: Path, out: Path, layers: int) -> int:
    """A Llama checkpoint of `layers` blocks, written tensor by tensor (never a whole model in
    memory), with the tiny Llama's tokenizer; returns the bytes of one block."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    tiny_cfg = json.loads((tokenizer_from / "config.json").read_text())
    config = {
        **tiny_cfg,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    vocab, kv = config["vocab_size"], HIDDEN // HEADS * KV_HEADS
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    block = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (kv, HIDDEN),
        "self_attn.v_proj.weight": (kv, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTER, HIDDEN),
        "mlp.up_proj.weight": (INTER, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTER),
    }
    index = {}
    for i in range(layers):  # one shard per block
        tensors = {f"model.layers.{i}.{k}": rnd(*s) for k, s in block.items()}
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        save_file(tensors, str(out / f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, f"model-{i:05d}.safetensors"))
    rest = {
        "model.embed_tokens.weight": rnd(vocab, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN),
        "lm_head.weight": rnd(vocab, HIDDEN),
    }
    save_file(rest, str(out / "model-rest.safetensors"), metadata={"format": "pt"})
    index.update(dict.fromkeys(rest, "model-rest.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return sum(a * b for a, b in block.values()) * 4


CHILD = """
import json, os, sys
import psutil
from edgekit.checkpoint import resolve
from edgekit.measure import PeakRSS
from edgekit.reference import build_reference, default_eval_text
import torch, transformers  # imported before the baseline: their cost is not the model's
ck = resolve(sys.argv[1])
base = psutil.Process().memory_info().rss
with PeakRSS(interval=0.02) as usage:
    # A short text: the weights, not the activations, are what this measures.
    ref = build_reference(ck, default_eval_text()[:600], ["The capital of France is"], 2, window=128)
print(json.dumps({"growth": usage.peak_bytes - base, "mode": ref.mode}))
"""


def streamed_peak_growth(path: Path, cache: Path, mode: str) -> int:
    env = {**os.environ, "EDGEKIT_CACHE": str(cache), "EDGEKIT_REFERENCE": mode}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["mode"] == mode
    return out["growth"]


@pytest.mark.slow
def test_streamed_peak_grows_with_one_block_not_the_model(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    n = 4
    block = write_random_llama(src, tmp_path / "n", n)
    write_random_llama(src, tmp_path / "2n", 2 * n)
    small = streamed_peak_growth(tmp_path / "n", tmp_path / "cache-n", "stream")
    large = streamed_peak_growth(tmp_path / "2n", tmp_path / "cache-2n", "stream")
    in_memory = streamed_peak_growth(tmp_path / "2n", tmp_path / "cache-mem", "memory")
    # n more blocks cost the in-memory reference n blocks of weights; the streamed one about
    # nothing (one block is resident at a time, whatever the depth). Both include the same
    # one-time costs (transformers' model code, tokenizer), so only differences are compared.
    assert large - small < 1.5 * block, (small, large, block)
    assert in_memory - large > n * block, (large, in_memory, block)


@pytest.mark.slow
def test_parity_json_records_reference_dtype_and_mode(tiny_gguf, monkeypatch, tmp_path):
    from edgekit import api

    bundle = shutil.copytree(tiny_gguf, tmp_path / "bundle")
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEKIT_REFERENCE", "stream")
    rep = api.verify(bundle)
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["reference"]["mode"] == rep.reference["mode"] == "stream"
    assert parity["reference"]["dtype"] == "float32" and parity["reference"]["cached"] is False


def test_compute_dtype_policy(tiny_dir, monkeypatch, tmp_path):
    from edgekit import layerwise
    from edgekit.errors import BadInput

    monkeypatch.delenv("EDGEKIT_COMPUTE_DTYPE", raising=False)
    monkeypatch.delenv("EDGEKIT_REFERENCE", raising=False)
    monkeypatch.setattr(layerwise, "native_half", lambda dtype: False)
    assert layerwise.compute_dtype("bfloat16") == "float32" and layerwise.compute_dtype("float16") == "float32"
    assert layerwise.compute_dtype("float32") == "float32"
    monkeypatch.setattr(layerwise, "native_half", lambda dtype: True)
    assert layerwise.compute_dtype("bfloat16") == "bfloat16"
    monkeypatch.setenv("EDGEKIT_COMPUTE_DTYPE", "float32")
    assert layerwise.compute_dtype("bfloat16") == "float32"
    monkeypatch.setenv("EDGEKIT_COMPUTE_DTYPE", "half")
    with pytest.raises(BadInput, match="EDGEKIT_COMPUTE_DTYPE"):
        layerwise.compute_dtype("bfloat16")
    # An upcast never holds the whole model in float32: it streams, however much memory is free.
    bf16 = to_bf16(tiny_dir("llama"), tmp_path / "llama-bf16")
    monkeypatch.setattr(layerwise, "available_bytes", lambda: 1 << 50)
    assert layerwise.mode_for(bf16, "float32") == "stream"
    assert layerwise.mode_for(bf16, "bfloat16") == "memory"
    assert layerwise.mode_for(bf16, "float32", "memory") == "memory"  # asked for explicitly


@pytest.mark.slow
def test_bf16_checkpoint_on_a_cpu_without_bf16_streams_float32_blocks(tiny_dir, monkeypatch, tmp_path):
    """Without native bf16 the reference is float32 arithmetic on the stored bf16 weights: the
    same logits as a float32 checkpoint holding exactly those values, computed in memory."""
    import torch
    from safetensors.torch import load_file, save_file

    from edgekit import layerwise
    from edgekit.checkpoint import resolve
    from edgekit.imatrix import load_or_compute
    from edgekit.reference import build_reference, default_eval_text

    monkeypatch.delenv("EDGEKIT_COMPUTE_DTYPE", raising=False)
    monkeypatch.delenv("EDGEKIT_REFERENCE", raising=False)
    monkeypatch.setattr(layerwise, "native_half", lambda dtype: False)
    bf16_dir = to_bf16(tiny_dir("llama"), tmp_path / "llama-bf16")
    rounded = tmp_path / "llama-rounded-fp32"  # the bf16 values, stored as float32
    shutil.copytree(bf16_dir, rounded)
    weights = load_file(str(bf16_dir / "model.safetensors"))
    save_file({k: v.to(torch.float32) for k, v in weights.items()}, str(rounded / "model.safetensors"))
    config = json.loads((rounded / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (rounded / "config.json").write_text(json.dumps(config))
    text = default_eval_text()
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache-bf16"))
    got = build_reference(resolve(str(bf16_dir)), text, PROMPTS, 8, window=128)
    assert got.dtype == "float32" and got.mode == "stream"
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache-fp32"))
    monkeypatch.setenv("EDGEKIT_REFERENCE", "memory")
    want = build_reference(resolve(str(rounded)), text, PROMPTS, 8, window=128)
    assert max_abs_diff(got, want) <= 1e-5 and got.greedy == want.greedy
    monkeypatch.delenv("EDGEKIT_REFERENCE")
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache-bf16"))
    im = load_or_compute(resolve(str(bf16_dir)))
    assert im.dtype == "float32" and im.mode == "stream"


@pytest.mark.slow
def test_long_texts_do_not_warn_about_the_maximum_sequence_length(tiny_dir, monkeypatch, tmp_path, capfd):
    """The eval and calibration texts are cut into windows before any model sees them, so
    transformers' "longer than the specified maximum sequence length" warning (printed in every
    3.8B+ export log with a fine-grained tokenizer) is noise: a tokenizer whose maximum is 64
    tokens must not print it."""
    from edgekit.checkpoint import resolve
    from edgekit.imatrix import load_or_compute
    from edgekit.reference import build_reference, default_eval_text

    src = tiny_dir("llama")
    short = tmp_path / "short"
    shutil.copytree(src, short)
    cfg_path = short / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = 64
    cfg_path.write_text(json.dumps(cfg))
    ck = resolve(str(short))
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    capfd.readouterr()
    build_reference(ck, default_eval_text(), PROMPTS, 2, window=32)
    load_or_compute(ck, budget=128)
    assert "maximum sequence length" not in capfd.readouterr().err
