"""Random-weight checkpoints with the exact config shapes of real models, for benchmarks/scale.py.

A 14B model cannot be instantiated in 24 GB to be saved, so the checkpoint is written tensor
by tensor, straight into safetensors shards: each shard's header is computed from the shapes,
then every tensor is drawn (in row chunks, so even a 200k-vocabulary embedding never sits in
memory as float32) and appended. Peak memory is one chunk, not the model.

Weights are N(0, 0.02) in bf16 (norm weights 1), drawn from a generator seeded by
(seed, tensor name): the same seed gives byte-identical shards whatever the shard size.

The tokenizer comes from edgekit.tiny (make_tiny of a family with the same tokenizer kind), so
llama.cpp's converter recognises it; the config keeps the real vocabulary size, and the
embedding rows past the tokenizer are padding, as in the real Phi-3 (32011 tokens, 32064 rows).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STD = 0.02  # the real models' initializer_range
SHARD_BYTES = 5 * 10**9  # ~5 GB per shard, as the Hub checkpoints are split
CHUNK_ELEMENTS = 32 * 2**20  # rows drawn at a time: 128 MiB of float32 at most
BF16_BYTES = 2

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama 3's special tokens, in the real tokenizer's order (ids 128000.. there; after SmolLM2's vocabulary here).
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _phi4_longrope(n: int = 48) -> dict[str, Any]:
    """LongRoPE factors shaped like Phi-4-mini's (one per rotary frequency: 96 / 2 = 48):
    short factors near 1, long factors growing with the wavelength. Values made up."""
    return {
        "type": "longrope",
        "short_factor": [round(1.0 + 0.002 * i, 4) for i in range(n)],
        "long_factor": [round(1.0 + 40.0 * (i / (n - 1)) ** 2, 4) for i in range(n)],
    }


@dataclass(frozen=True)
class ScaleModel:
    name: str
    real: str  # the checkpoint whose shapes these are
    architecture: str  # config.json "architectures"[0]
    model_type: str
    tiny_family: str  # edgekit.tiny family whose tokenizer (kind and chat tokens) is reused
    config: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ScaleModel] = {
    m.name: m
    for m in [
        # A toy shape for the smoke run and the tests: every code path of llama-3.2-1b, seconds to run.
        ScaleModel(
            "smoke-llama",
            "tiny Llama 3 shape",
            "LlamaForCausalLM",
            "llama",
            "qwen2",
            dict(
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=64,
                vocab_size=50000,
                tie_word_embeddings=True,
                rope_theta=500000.0,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=32.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=8192,
                ),
            ),
        ),
        # SmolLM2-135M: the embedded default model's shapes (tied 49k embedding, 30 thin layers), the
        # small end of the preflight fit (benchmarks/preflight_fit.py), minutes per step.
        ScaleModel(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "LlamaForCausalLM",
            "llama",
            "qwen2",
            dict(
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                head_dim=64,
                vocab_size=49152,
                tie_word_embeddings=True,
                rope_theta=100000.0,
                max_position_embeddings=8192,
                rms_norm_eps=1e-5,
            ),
        ),
        # Llama-3.2-1B: tied 128k-vocabulary embedding (a quarter of the parameters), Llama 3 RoPE scaling.
        ScaleModel(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B-Instruct",
            "LlamaForCausalLM",
            "llama",
            "qwen2",
            dict(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=64,
                vocab_size=128256,
                tie_word_embeddings=True,
                rope_theta=500000.0,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=32.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=8192,
                ),
            ),
        ),
        # Phi-3-mini-4k-instruct: fused qkv / gate_up, no GQA, untied, 32064 rows over 32011 tokens.
        ScaleModel(
            "phi3-mini",
            "microsoft/Phi-3-mini-4k-instruct",
            "Phi3ForCausalLM",
            "phi3",
            "phi3",
            dict(
                hidden_size=3072,
                intermediate_size=8192,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32064,
                max_position_embeddings=4096,
                original_max_position_embeddings=4096,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
            ),
        ),
        # Phi-4-mini-instruct: 200k vocabulary (tied), GQA 24/8, partial rotary 0.75, LongRoPE.
        ScaleModel(
            "phi4-mini",
            "microsoft/Phi-4-mini-instruct",
            "Phi3ForCausalLM",
            "phi3",
            "phi4-mini",
            dict(
                hidden_size=3072,
                intermediate_size=8192,
                num_hidden_layers=32,
                num_attention_heads=24,
                num_key_value_heads=8,
                vocab_size=200064,
                partial_rotary_factor=0.75,
                tie_word_embeddings=True,
                max_position_embeddings=131072,
                original_max_position_embeddings=4096,
                rope_scaling=_phi4_longrope(),
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
            ),
        ),
        # Phi-3-medium-4k-instruct (14B): GQA 40/10, 4k context, untied.
        ScaleModel(
            "phi3-medium",
            "microsoft/Phi-3-medium-4k-instruct",
            "Phi3ForCausalLM",
            "phi3",
            "phi3",
            dict(
                hidden_size=5120,
                intermediate_size=17920,
                num_hidden_layers=40,
                num_attention_heads=40,
                num_key_value_heads=10,
                vocab_size=32064,
                max_position_embeddings=4096,
                original_max_position_embeddings=4096,
                rope_theta=10000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
            ),
        ),
    ]
}


def get_model(name: str) -> ScaleModel:
    try:
        return MODELS[name]
    except KeyError:
        raise SystemExit(f"unknown scale model {name!r}; choose from: {', '.join(MODELS)}") from None


# --- layout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    ones: bool  # a norm weight (1), not a random matrix

    @property
    def nbytes(self) -> int:
        n = BF16_BYTES
        for d in self.shape:
            n *= d
        return n


def tensor_layout(model: ScaleModel) -> list[TensorSpec]:
    """Every tensor transformers' LlamaForCausalLM / Phi3ForCausalLM saves, in checkpoint order."""
    c = model.config
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), False)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if model.model_type == "phi3":  # fused projections
            attn = [("self_attn.qkv_proj", ((heads + 2 * kv) * head_dim, hidden))]
            mlp = [("mlp.gate_up_proj", (2 * inter, hidden))]
        else:
            attn = [
                ("self_attn.q_proj", (heads * head_dim, hidden)),
                ("self_attn.k_proj", (kv * head_dim, hidden)),
                ("self_attn.v_proj", (kv * head_dim, hidden)),
            ]
            mlp = [("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden))]
        attn.append(("self_attn.o_proj", (hidden, heads * head_dim)))
        mlp.append(("mlp.down_proj", (hidden, inter)))
        specs += [TensorSpec(p + "input_layernorm.weight", (hidden,), True)]
        specs += [TensorSpec(p + n + ".weight", s, False) for n, s in attn]
        specs += [TensorSpec(p + "post_attention_layernorm.weight", (hidden,), True)]
        specs += [TensorSpec(p + n + ".weight", s, False) for n, s in mlp]
    specs.append(TensorSpec("model.norm.weight", (hidden,), True))
    if not c.get("tie_word_embeddings", False):
        specs.append(TensorSpec("lm_head.weight", (vocab, hidden), False))
    return specs


def parameter_count(model: ScaleModel) -> int:
    return sum(s.nbytes for s in tensor_layout(model)) // BF16_BYTES


def checkpoint_bytes(model: ScaleModel) -> int:
    return sum(s.nbytes for s in tensor_layout(model))


def shard(specs: list[TensorSpec], shard_bytes: int = SHARD_BYTES) -> list[list[TensorSpec]]:
    """Consecutive tensors, a new shard whenever the current one would pass shard_bytes."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


# --- writing ---------------------------------------------------------------------------------


def _seed_of(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _write_tensor(f, spec: TensorSpec, seed: int) -> None:
    import torch

    if spec.ones:
        f.write(torch.ones(spec.shape, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
        return
    gen = torch.Generator().manual_seed(_seed_of(seed, spec.name))
    rows, cols = spec.shape
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        chunk = torch.empty((n, cols), dtype=torch.float32).normal_(0.0, STD, generator=gen)
        f.write(chunk.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def _write_shard(path: Path, specs: list[TensorSpec], seed: int) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            _write_tensor(f, s, seed)


def _tokenizer_from_tiny(model: ScaleModel, out: Path) -> dict[str, Any]:
    """Copy the tokenizer files of edgekit.tiny's family into `out`; return the token ids the
    configs need (bos / eos / pad, generation eos list)."""
    from edgekit.tiny import make_tiny

    with tempfile.TemporaryDirectory(prefix="scale-tok-") as scratch:
        tiny = make_tiny(model.tiny_family, Path(scratch) / "tiny")
        for f in tiny.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template")):
                shutil.copyfile(f, out / f.name)
        cfg = json.loads((tiny / "config.json").read_text())
        gen = json.loads((tiny / "generation_config.json").read_text())
    ids = {k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids["generation_eos"] = gen.get("eos_token_id")
    if (model.config.get("rope_scaling") or {}).get("rope_type") == "llama3":  # Llama 3, not SmolLM2's llama
        ids = _llama3_tokens(out)
    return ids


def _llama3_tokens(out: Path) -> dict[str, Any]:
    """Give the byte-level tokenizer Llama 3's special tokens and chat template."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL], special_tokens=True)
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.pad_token = None
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(out, save_jinja_files=False)
    stop = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": stop, "pad_token_id": None, "generation_eos": stop}


def write_config(model: ScaleModel, out: Path, ids: dict[str, Any]) -> None:
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.for_model(
        model.model_type,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        initializer_range=STD,
        **json.loads(json.dumps(model.config)),
    )
    config.architectures = [model.architecture]
    config.dtype = "bfloat16"
    config.to_json_file(out / "config.json")
    GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["generation_eos"], pad_token_id=ids["pad_token_id"]
    ).to_json_file(out / "generation_config.json")


def write_checkpoint(model: ScaleModel, out: Path, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the whole checkpoint into `out` (created; a partial one is removed on failure)."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ids = _tokenizer_from_tiny(model, tmp)
        write_config(model, tmp, ids)
        shards = shard(tensor_layout(model), shard_bytes)
        weight_map = {}
        for i, specs in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(tmp / fname, specs, seed)
            weight_map.update({s.name: fname for s in specs})
            print(f"[scale] wrote {fname} ({sum(s.nbytes for s in specs) / 2**30:.2f} GiB)", flush=True)
        index = {"metadata": {"total_size": checkpoint_bytes(model)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":  # one measured step of scale.py: python _scale_models.py MODEL OUT [SEED]
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    write_checkpoint(get_model(sys.argv[1]), Path(sys.argv[2]), seed=int(sys.argv[3]) if len(sys.argv) > 3 else 0)
