"""The gguf-q4_k_m recipe (typed keys of targets/gguf-q4_k_m.toml) and the bundle's fixed names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import BadInput

# Architectures we claim: each is registered in the converter (conversion/__init__.py
# TEXT_MODEL_MAP) and exported + run by tests/test_gguf.py from an edgekit.tiny checkpoint.
SUPPORTED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM",     # Llama 2/3, SmolLM2
    "MistralForCausalLM",   # converted by the llama converter class
    "Qwen2ForCausalLM",
    "Phi3ForCausalLM",      # Phi-3 / 3.5 / 4-mini: fused qkv and gate_up stay fused (attn_qkv, ffn_up)
    "PhiMoEForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
})
# No second export path: an architecture the converter does not know is refused.
FALLBACK_ARCHITECTURES: frozenset[str] = frozenset()

MODEL_FILE = "model.gguf"
PATH_TAKEN = "convert_hf_to_gguf+llama_model_quantize"
# Small files that let transformers (and people) load the reference tokenizer and chat
# template from the bundle. config.json is left out on purpose: with it the bundle would
# look like a loadable HF checkpoint, which it is not.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
DEFAULT_CONTEXT = 4096

_INTERMEDIATES = ("f16", "bf16", "f32")
# "none": llama.cpp's plain quantizers; "calibration": an importance matrix computed from the
# reference model over edgekit/data/calibration.txt (edgekit/imatrix.py) weights the rounding.
IMATRIX_SOURCES = ("none", "calibration")


@dataclass(frozen=True)
class GgufRecipe:
    intermediate: str = "f16"
    quant_type: str = "Q4_K_M"
    quant_threads: int = 0
    imatrix: str = "none"

    @property
    def ftype_name(self) -> str:
        # F32 is llama.cpp's one "ALL_" type: unquantized, for architecture parity baselines.
        return "LLAMA_FTYPE_ALL_F32" if self.quant_type == "F32" else f"LLAMA_FTYPE_MOSTLY_{self.quant_type}"

    @property
    def ftype(self) -> int:
        import llama_cpp

        return getattr(llama_cpp, self.ftype_name)


def parse_recipe(table: dict[str, Any], where: str) -> GgufRecipe:
    from ...targets import dataclass_from_table

    recipe = dataclass_from_table(GgufRecipe, table, where)
    if recipe.intermediate not in _INTERMEDIATES:
        raise BadInput(f"{where}: intermediate must be one of {', '.join(_INTERMEDIATES)}, got {recipe.intermediate!r}",
                       "Use \"f16\" unless the model overflows in f16")
    if recipe.imatrix not in IMATRIX_SOURCES:
        raise BadInput(f"{where}: imatrix must be one of {', '.join(IMATRIX_SOURCES)}, got {recipe.imatrix!r}",
                       "Use \"calibration\" (importance matrix from the reference model) or \"none\"")
    if recipe.quant_threads < 0:
        raise BadInput(f"{where}: quant_threads must be 0 (all cores) or more, got {recipe.quant_threads}",
                       "Fix quant_threads")
    try:
        recipe.ftype
    except AttributeError:
        raise BadInput(f"{where}: llama.cpp has no quantization type {recipe.quant_type!r}",
                       "Use a llama_ftype name without the LLAMA_FTYPE_MOSTLY_ prefix, e.g. Q4_K_M") from None
    except ImportError:
        raise BadInput("llama-cpp-python is not installed", "pip install 'edgekit[runtimes]' to export GGUF") from None
    return recipe
