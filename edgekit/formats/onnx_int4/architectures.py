"""Which architectures onnx-int4 exports, by which path, and where its runtime stops matching."""

from __future__ import annotations

# config.json "architectures"[0] -> why the builder (onnxruntime-genai 0.15.2, builder.py's
# dispatch in create_model) handles it and what to know. Every row exports for the CPU EP.
BUILDER_ARCHITECTURES: dict[str, str] = {
    # Phi-3/3.5/4-mini: fused qkv_proj and gate_up_proj. The builder picks its LongRoPE
    # variant itself when max_position_embeddings != original_max_position_embeddings.
    "Phi3ForCausalLM": "Phi3Mini / Phi3MiniLongRoPE",
    # Phi-3-small: block-sparse attention (SparseAttention op, has a CPU kernel); its modeling
    # code is not in transformers, so the checkpoint needs --trust-remote-code.
    "Phi3SmallForCausalLM": "Phi3Small / Phi3SmallLongRoPE, remote code",
    # Llama 2/3.x and SmolLM2: the reference decoder; llama3 rope_scaling handled.
    "LlamaForCausalLM": "Llama",
    # Mistral 7B: Llama layout with sliding-window attention.
    "MistralForCausalLM": "Mistral",
    # Qwen2/2.5: qkv biases, tied embeddings in the small sizes.
    "Qwen2ForCausalLM": "Qwen2",
    "Qwen3ForCausalLM": "Qwen3: q/k norms",
    # Gemma 1/2/3: scaled embeddings, soft-capping (2), sliding-window layers (2, 3).
    "GemmaForCausalLM": "Gemma",
    "Gemma2ForCausalLM": "Gemma2",
    "Gemma3ForCausalLM": "Gemma3 text-only (gemma3_text)",
    # Phi-1/1.5/2: parallel attention + MLP, partial rotary.
    "PhiForCausalLM": "Phi",
    "GraniteForCausalLM": "Granite",
    "OlmoForCausalLM": "OLMo",
    "NemotronForCausalLM": "Nemotron",
    "SmolLM3ForCausalLM": "SmolLM3: NoPE layers",
    "Ernie4_5ForCausalLM": "Ernie 4.5",
    "InternLM2ForCausalLM": "InternLM2, remote code",
    "Lfm2ForCausalLM": "LFM2: conv + attention hybrid",
    "HunYuanDenseV1ForCausalLM": "HunYuan dense",
    "GptOssForCausalLM": "gpt-oss: QMoE experts, symmetric only",
}

# In the builder's dispatch but not offered: they cannot give a CPU int4 text bundle.
BUILDER_EXCLUDED: dict[str, str] = {
    # The builder switches PhiMoE to the CUDA EP ("MoE only supported for CUDA").
    "PhiMoEForCausalLM": "builder forces execution_provider=cuda",
    # Multimodal: the builder writes only the text decoder with exclude_embeds=true, which
    # expects inputs_embeds from a vision/audio encoder that edgekit does not build.
    "Phi3VForCausalLM": "text part only, needs an external embedding model",
    "Phi4MMForCausalLM": "text part only, needs an external embedding model",
    "Gemma3ForConditionalGeneration": "text part only, needs an external embedding model",
    "Qwen2_5_VLForConditionalGeneration": "text part only, needs an external embedding model",
    "WhisperForConditionalGeneration": "speech model, not a causal LM",
}

SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset(BUILDER_ARCHITECTURES)

# What the long-context probe (edgekit.longcontext) names when parity stops early, by where.
LONG_CONTEXT_LIMITS: dict[str, str] = {
    # Measured on tiny phi3-longrope: past the original context onnxruntime-genai 0.15.2
    # switches to the long cos/sin cache for new tokens (an If on the sequence length) but
    # keeps the KV cache it filled with the short factors; transformers recomputes it with
    # the long ones at that point. Matches transformers-without-the-reset to KLD 5e-9.
    "after": ("onnxruntime-genai 0.15.2 keeps the KV cache it computed with LongRoPE's short factors past "
              "token {boundary} (transformers recomputes it with the long factors): parity holds to {reach} "
              "tokens; keep the default context_length, which caps the bundle there"),
    "context": ("the bundle's context is capped at {context} tokens (recipe context_length), where "
                "onnxruntime-genai 0.15.2 would otherwise leave transformers' LongRoPE behaviour"),
}

# Architectures whose onnxruntime-genai graph is known to compute something other than
# transformers (edgekit.parity names them when the gate fails): none measured so far.
KNOWN_DIFFERENCES: dict[str, str] = {}

# What the optimum fallback exports (task text-generation-with-past) into a graph whose KV
# cache is [batch, kv_heads, seq, head_dim] per layer, the layout onnxruntime-genai drives.
# Bloom and GPTBigCode are left out on purpose: their caches are fused or transposed.
FALLBACK_ARCHITECTURES: frozenset[str] = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Phi3ForCausalLM", "PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
    "StableLmForCausalLM", "GPTNeoXForCausalLM", "CohereForCausalLM",
})

# Model types the onnxruntime-genai 0.15.2 runtime accepts in genai_config.json "type"
# (strings in libonnxruntime-genai.so). They all load as a plain decoder-only model; the
# fallback uses the checkpoint's model_type when listed, else "llama" (the same code path).
GENAI_DECODER_TYPES = frozenset({
    "chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "granite", "internlm2",
    "llama", "mistral", "nemotron", "olmo", "phi", "phi3", "qwen2", "qwen3", "smollm3",
})
