"""Tiny random checkpoints, one per architecture family, for tests and coverage benchmarks.

A tiny checkpoint is a complete Hugging Face directory (config.json, model.safetensors,
tokenizer files with a chat template, generation_config.json) with random weights: 2 layers,
hidden 64, 4 heads, 2 KV heads. It exercises the same converter code paths as the real model
(weight names, fused projections, rope scaling, tokenizer type) in a few seconds, offline.

SentencePiece families get a vocabulary trained here, on CORPUS, by the `sentencepiece`
package. Byte-level BPE families cannot: llama.cpp's converter only accepts a BPE
pre-tokenizer it recognises by hashing the tokenizer's output, so those rows reuse the
repaired SmolLM2 tokenizer that `edgekit.embedded` builds (llama.cpp knows it as "smollm").
That costs a one-time download and build of the embedded model.

The SentencePiece tokenizers are "legacy" Llama ones, like the real Phi-3 / Llama 2 files: text
after a special token gets a leading "▁". llama.cpp and onnxruntime-genai tokenize that way
too, so all three runtimes produce the same ids for the same text (checked for every family).

Example:
    from edgekit.tiny import FAMILIES, make_tiny
    path = make_tiny("phi3", Path("/tmp/tiny-phi3"))
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput, EdgekitError, UnsupportedArchitecture
from .tinytok import TOKENIZERS, Tokens, patch_json

MARKER = "edgekit-tiny.json"  # {family, seed}: lets make_tiny recognise, and replace, its own output

# Sizes shared by every family: small enough to build and run in seconds, large enough that
# int4 block quantization (block 32) and GQA (4 query heads on 2 KV heads) still apply.
# initializer_range 0.2 (not the usual 0.02): random weights that small give near-uniform
# next-token distributions, where top-1 agreement between runtimes is a coin toss; at 0.2 the
# distributions are peaked enough (mean top probability ~0.07 of 512) for parity to mean something.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
)
HEAD_DIM = int(TINY["hidden_size"] // TINY["num_attention_heads"])

# --- chat templates (the real models' templates, lightly trimmed) ---------------------------

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma has no system role: Gemma 3's template folds a system message into the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _longrope(rotary_dim: int = HEAD_DIM, **extra: Any) -> dict[str, Any]:
    """Phi-3-mini-128k's rope_scaling shape: one factor per rotary frequency (rotary_dim / 2;
    the whole head for Phi-3, 3/4 of it for Phi-4-mini).

    The values are made up but shaped like the real ones: short factors near 1, long factors
    growing with the wavelength, so switching between them changes the output.
    """
    n = rotary_dim // 2
    return {
        "type": "longrope",
        "short_factor": [round(1.0 + 0.05 * i, 4) for i in range(n)],
        "long_factor": [round(1.0 + 4.0 * i * i / (n - 1), 4) for i in range(n)],
        **extra,
    }


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # config.json "architectures"[0], as the real checkpoints spell it
    model_type: str  # transformers config key
    tokenizer: str  # key into TOKENIZERS
    chat_template: str
    config: dict[str, Any] = field(default_factory=dict)  # on top of TINY
    unbuildable: str | None = None  # why make_tiny cannot build it

    @property
    def needs_embedded(self) -> bool:
        """True when building it needs the SmolLM2 tokenizer (a one-time download and build)."""
        return self.tokenizer.startswith("smollm2")


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        # Phi-3-mini-4k: fused qkv_proj / gate_up_proj, Llama SentencePiece vocabulary plus Phi-3's
        # chat tokens as added tokens, and an embedding padded past the tokenizer (32011 -> 32064
        # in the real model; 491 -> 512 here) that exporters must tolerate.
        Family(
            "phi3",
            "Phi3ForCausalLM",
            "phi3",
            "phi3",
            PHI3_TEMPLATE,
            dict(vocab_size=512, max_position_embeddings=4096, original_max_position_embeddings=4096),
        ),
        # Phi-3-mini-128k and Phi-3.5-mini: same weights, LongRoPE rope_scaling over the whole
        # head; exporters pick another code path
        # (genai builder: Phi3MiniLongRoPEModel; llama.cpp: rope_factors_long/short tensors).
        Family(
            "phi3-longrope",
            "Phi3ForCausalLM",
            "phi3",
            "phi3",
            PHI3_TEMPLATE,
            dict(
                vocab_size=512,
                max_position_embeddings=131072,
                original_max_position_embeddings=4096,
                rope_scaling=_longrope(),
            ),
        ),
        # Phi-4-mini: partial rotary (rotary on 3/4 of each head: 96 of 128 lanes in the real
        # model, 48 of 64 here), LongRoPE whose factor lists cover the rotary dims only
        # (rotary_dim / 2 entries), 131072 over an original 4096, tied embeddings, GQA, and a
        # byte-level BPE vocabulary. Head size 64 and a rotary cache 24 wide respect ONNX
        # Runtime's GroupQueryAttention (head size a multiple of 16, cache width a multiple of 8).
        # The vocabulary is SmolLM2's (llama.cpp must recognise the pre-tokenizer by its hash;
        # Phi-4-mini's own o200k one cannot be trained here) plus Phi-4's chat tokens.
        Family(
            "phi4-mini",
            "Phi3ForCausalLM",
            "phi3",
            "smollm2-phi4",
            PHI3_TEMPLATE,
            dict(
                hidden_size=256,
                intermediate_size=512,
                num_attention_heads=4,
                num_key_value_heads=2,
                partial_rotary_factor=0.75,
                tie_word_embeddings=True,
                max_position_embeddings=131072,
                original_max_position_embeddings=4096,
                rope_scaling=_longrope(rotary_dim=48),
            ),
        ),
        # Phi-3-medium (14B): GQA at 4 query heads per KV head (40 / 10 in the real model, 8 / 2
        # here), where the minis have none; 4k context, plain RoPE.
        Family(
            "phi3-medium",
            "Phi3ForCausalLM",
            "phi3",
            "phi3",
            PHI3_TEMPLATE,
            dict(
                vocab_size=512,
                hidden_size=128,
                intermediate_size=384,
                num_attention_heads=8,
                num_key_value_heads=2,
                max_position_embeddings=4096,
                original_max_position_embeddings=4096,
            ),
        ),
        # Llama 2 / TinyLlama: the baseline SentencePiece Llama, separate q/k/v and gate/up.
        Family("llama", "LlamaForCausalLM", "llama", "llama", LLAMA2_TEMPLATE, dict(max_position_embeddings=2048)),
        # Mistral v0.3: Llama layout under another name; [INST] and [/INST] are control tokens.
        Family(
            "mistral",
            "MistralForCausalLM",
            "mistral",
            "mistral",
            MISTRAL_TEMPLATE,
            dict(max_position_embeddings=4096, sliding_window=None),
        ),
        # Qwen2 / Qwen2.5: q/k/v biases, tied embeddings, byte-level BPE with ChatML.
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "qwen2",
            "smollm2",
            QWEN2_TEMPLATE,
            dict(max_position_embeddings=4096, tie_word_embeddings=True, use_sliding_window=False),
        ),
        # Gemma 2: explicit head_dim, logit soft-capping, alternating sliding-window layers,
        # norms stored as (weight - 1), embeddings scaled by sqrt(hidden), tied embeddings.
        Family(
            "gemma2",
            "Gemma2ForCausalLM",
            "gemma2",
            "gemma",
            GEMMA_TEMPLATE,
            dict(
                head_dim=HEAD_DIM,
                query_pre_attn_scalar=HEAD_DIM,
                max_position_embeddings=8192,
                sliding_window=512,
                tie_word_embeddings=True,
            ),
        ),
        # Gemma 3 text-only (like gemma-3-270m): q/k norms, separate local/global rope bases,
        # sliding window on 5 of every 6 layers. The window (512) exceeds any test prompt, so
        # runtimes that place the sliding layers differently still agree on short texts.
        Family(
            "gemma3",
            "Gemma3ForCausalLM",
            "gemma3_text",
            "gemma",
            GEMMA_TEMPLATE,
            dict(
                head_dim=HEAD_DIM,
                query_pre_attn_scalar=HEAD_DIM,
                max_position_embeddings=32768,
                sliding_window=512,
                rope_theta=1_000_000.0,
                rope_local_base_freq=10_000.0,
                tie_word_embeddings=True,
            ),
        ),
        # Phi-3.5-MoE: sparse mixture of experts (4 experts, top-2 here), LayerNorm, attention and
        # lm_head biases, LongRoPE. Spelled "PhiMoEForCausalLM" like the real checkpoint (the
        # transformers class is PhimoeForCausalLM); the genai builder only exports it for CUDA.
        Family(
            "phimoe",
            "PhiMoEForCausalLM",
            "phimoe",
            "phi3",
            PHI3_TEMPLATE,
            dict(
                vocab_size=512,
                max_position_embeddings=131072,
                original_max_position_embeddings=4096,
                num_local_experts=4,
                num_experts_per_tok=2,
                attention_bias=True,
                lm_head_bias=True,
                # Phi-3.5-MoE's rope_scaling also carries the attention scales (mscale) and the
                # original context; transformers' PhimoeConfig requires them.
                rope_scaling=_longrope(short_mscale=1.2432, long_mscale=1.2432, original_max_position_embeddings=4096),
            ),
        ),
        # Phi-3-small: blocksparse attention, tiktoken cl100k vocabulary.
        Family(
            "phi3small",
            "Phi3SmallForCausalLM",
            "phi3small",
            "phi3",
            PHI3_TEMPLATE,
            unbuildable="transformers 4.57 has no Phi3Small model: it exists only as trust_remote_code "
            "code on the Hub (model and tiktoken tokenizer), which edgekit must not download",
        ),
    ]
}


def get_family(name: str) -> Family:
    """The FAMILIES row for `name`; BadInput if there is none."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise BadInput(f"unknown tiny family {name!r}", fix=f"choose one of: {', '.join(FAMILIES)}") from None


def make_tiny(family: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `family` to `out` and return `out`.

    The same family and seed give byte-identical files. `out` must be new, empty, or an earlier
    make_tiny output (which is replaced). The directory appears complete or not at all.
    """
    fam = get_family(family)
    if fam.unbuildable:
        raise UnsupportedArchitecture(f"cannot build tiny {fam.name!r}: {fam.unbuildable}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise BadInput(f"{out} exists and is not a tiny checkpoint", fix="choose a new or empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(fam, tmp, seed)
        (tmp / MARKER).write_text(json.dumps({"family": fam.name, "seed": seed}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build(fam: Family, out: Path, seed: int) -> None:
    """Write the tokenizer, config and random weights of `fam` into `out` (make_tiny publishes it)."""
    tokens = TOKENIZERS[fam.tokenizer](fam, out)
    _write_model(fam, tokens, out, seed)


# --- model -----------------------------------------------------------------------------------


def runtime_shape_problems(settings: dict[str, Any]) -> list[str]:
    """Shapes a tiny model must avoid so that it fails only where the real model would.

    - ONNX Runtime's GroupQueryAttention refuses head sizes that are not a multiple of 16, and
      rotary caches (rotary_dim / 2 wide) that are not a multiple of 8.
    - onnxruntime-genai 0.15.2's builder takes any Linear whose out_features equals the
      vocabulary size for the lm_head (base.py has_lm_head), so a fused gate_up_proj of
      2 x intermediate = vocab rows gets written as a second lm_head. Real models never meet
      that (Phi-3-mini: 16384 vs 32064), a 512-token tiny vocabulary easily does.
    """
    problems = []
    heads = settings["num_attention_heads"]
    head = settings.get("head_dim") or settings["hidden_size"] // heads
    rotary = int(head * settings.get("partial_rotary_factor", 1.0))
    if head % 16:
        problems.append(f"head size {head} is not a multiple of 16 (GroupQueryAttention)")
    if (rotary // 2) % 8:
        problems.append(f"rotary cache width {rotary // 2} is not a multiple of 8 (GroupQueryAttention)")
    from .formats import REGISTRY, backend

    for name in REGISTRY:  # what each format's own tools mishandle (e.g. the genai builder's lm_head guess)
        problems += backend(name).config_problems(settings)
    return problems


def _write_model(fam: Family, tokens: Tokens, out: Path, seed: int) -> None:
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    settings = {**TINY, **copy.deepcopy(fam.config)}  # deep copy: configs edit rope_scaling
    settings.setdefault("vocab_size", tokens.count)
    if settings["vocab_size"] < tokens.count:
        raise EdgekitError(f"tiny {fam.name}: vocab_size {settings['vocab_size']} < {tokens.count} tokens")
    if problems := runtime_shape_problems(settings):
        raise EdgekitError(f"tiny {fam.name}: {'; '.join(problems)}")
    config = AutoConfig.for_model(
        fam.model_type, bos_token_id=tokens.bos, eos_token_id=tokens.eos, pad_token_id=tokens.pad, **settings
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokens.bos, eos_token_id=tokens.stop, pad_token_id=tokens.pad
    )
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained writes the transformers class name; write the real checkpoints' spelling.
    patch_json(out / "config.json", architectures=[fam.architecture])
