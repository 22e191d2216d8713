"""Where llama.cpp is known to compute something other than transformers: named, not hidden."""

from __future__ import annotations

# What the long-context probe (edgekit.longcontext) names when parity stops early, by where.
LONG_CONTEXT_LIMITS: dict[str, str] = {
    # llama.cpp picks LongRoPE's factors once per context: the long ones at every position
    # when n_ctx exceeds the original context. A run that crosses token {boundary} with a
    # context sized for it therefore differs from transformers before the boundary.
    "before": (
        "llama.cpp uses LongRoPE's long factors at every position once n_ctx exceeds {boundary}, so "
        "the tokens of a run before {boundary} differ from transformers; edgekit run and bench open "
        "the context at {boundary} when prompt + output fit in it"
    ),
    "after": "llama.cpp leaves transformers' behaviour past token {boundary}: parity holds to {reach} tokens",
}
# Architectures whose llama.cpp graph is known to compute something other than transformers,
# named by the export notes and by the parity gate when it fails. One row per architecture.
KNOWN_DIFFERENCES: dict[str, str] = {
    # Measured on edgekit.tiny's phimoe exported to F32: KLD 1.1 against transformers; with
    # transformers patched to RMSNorm + softmax top-2 routing, KLD 0.006. llama.cpp 0.3.36
    # builds PhiMoE with its Phi-3 graph (src/models/models.h: phimoe's graph is phi3's).
    "PhiMoEForCausalLM": (
        "llama.cpp (llama-cpp-python 0.3.36) runs PhiMoE through its Phi-3 graph: RMSNorm where transformers' "
        "PhiMoE uses LayerNorm, softmax top-2 routing with renormalised weights where it uses SparseMixer, and "
        "the converter's sqrt(1 + ln(s)/ln(n_orig)) attention factor instead of rope_scaling's short/long_mscale"
    ),
}
