"""The onnx-int4 recipe: typed keys of targets/onnx-int4.toml, checked, and the builder's strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import BadInput

ENGINES = ("auto", "builder", "optimum")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
EMBEDDINGS = ("auto", "float", "int4", "int8")
PRECISIONS = ("int4", "fp32")
# How the int4/int8 codes of each MatMul are chosen (see requantize() below).
WEIGHT_SEARCHES = ("builder", "edgekit", "imatrix", "gptq")
# How a re-quantized int4 block stores its offset (w ~ (q - zero point) * scale):
ZERO_POINTS = (
    "integer",  # uint8 zero points: MatMulNBits' packed int4 kernel
    "float",  # float zero points in MatMulNBits: any offset (Q4_1 / Q4_K's float minimum), but
    # onnxruntime 1.32 runs them on its unpacked path (dequantize, then float GEMM), far slower
    "float_matmul",  # the same float minimums, beside a symmetric MatMulNBits: block sums of the
    # input times the minimums, a float MatMul 1/block the weight's size; the packed kernel's speed
)
# Per-layer projections int8_matmuls may name (builder and optimum node names).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# algorithm -> (base method, MatMul groups raised to int8). The builder's algo_config takes
# exactly these names (builders/quant_config.py, _LEGACY_ALGO_ALIASES); the fallback reads the
# same table so both paths mean the same thing by a name.
ALGORITHMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "default": ("default", ()),  # MLAS round-to-nearest, every MatMul int4
    "rtn": ("rtn", ()),  # round-to-nearest (neural-compressor flavour)
    "k_quant": ("k_quant", ()),  # k-quant search of scales, every MatMul int4
    "rtn_last": ("rtn", ("last_matmul",)),
    "k_quant_last": ("k_quant", ("last_matmul",)),
    # + the layers llama.cpp's Q4_K_M also keeps at higher precision (use_more_bits)
    "k_quant_mixed": ("k_quant", ("last_matmul", "mixed_layers")),
    "k_quant_linear": ("k_quant", ("last_matmul", "linear_attn")),
}


@dataclass(frozen=True)
class OnnxRecipe:
    engine: str = "auto"  # "auto" | "builder" | "optimum" (fallback path, forced)
    precision: str = "int4"  # "int4"; "fp32" for a float reference bundle (parity baselines)
    block_size: int = 32  # input channels per quantization block
    accuracy_level: int = 4  # MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    algorithm: str = "k_quant_mixed"  # a key of ALGORITHMS
    is_symmetric: bool = True  # int4 without zero points
    float_lm_head: bool = False  # leave /lm_head/MatMul unquantized
    embeddings: str = "auto"  # "auto": as built (float untied, shared tied; int8 untied when mobile);
    # "float"; "int4" / "int8": edgekit's GatherBlockQuantized codes (embedquant.py)
    weight_search: str = (
        "builder"  # "builder": keep the quantizer's codes; "edgekit"/"imatrix"/"gptq": edgekit re-quantizes
    )
    int8_matmuls: tuple[str, ...] = ()  # projections raised to int8 in every layer, on top of the algorithm's choice
    int8_block_size: int = 0  # block size of the int8 MatMuls edgekit writes; 0: block_size
    zero_points: str = "integer"  # int4 blocks' offset: "integer", "float" or "float_matmul" (ZERO_POINTS)
    context_length: int = 0  # longest sequence the bundle accepts; 0: the model's, capped where
    # the runtime stops matching transformers (LONG_CONTEXT_LIMITS)
    mobile: bool = False  # phone bundle: model.ort (ORT format) + required_operators.config (mobile.py)


def parse_recipe(table: dict[str, Any], where: str) -> OnnxRecipe:
    from ...targets import dataclass_from_table

    table = dict(table)
    if isinstance(table.get("int8_matmuls"), (list, str)):
        # TOML gives a list, `--set int8_matmuls=v_proj,down_proj` a string ("" for none).
        value = table["int8_matmuls"]
        table["int8_matmuls"] = (
            tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
        )
    recipe = dataclass_from_table(OnnxRecipe, table, where)
    for name in recipe.int8_matmuls:
        if name not in PROJECTIONS:
            raise BadInput(
                f"{where}: int8_matmuls names {name!r}, not a projection", f"Use some of: {', '.join(PROJECTIONS)}"
            )
    checks = (
        ("engine", ENGINES),
        ("precision", PRECISIONS),
        ("block_size", BLOCK_SIZES),
        ("accuracy_level", ACCURACY_LEVELS),
        ("algorithm", tuple(ALGORITHMS)),
        ("embeddings", EMBEDDINGS),
        ("weight_search", WEIGHT_SEARCHES),
        ("int8_block_size", (0, *BLOCK_SIZES)),
        ("zero_points", ZERO_POINTS),
    )
    for key, allowed in checks:
        value = getattr(recipe, key)
        # bool is an int to Python; `block_size = true` must not pass as 1.
        if value not in allowed or isinstance(value, bool):
            raise BadInput(
                f"{where}: {key} = {value!r} is not allowed", f"Use one of: {', '.join(str(a) for a in allowed)}"
            )
    if recipe.context_length < 0 or isinstance(recipe.context_length, bool):
        raise BadInput(
            f"{where}: context_length = {recipe.context_length!r} is not allowed",
            "Use 0 (the model's, capped for LongRoPE) or a number of tokens",
        )
    if recipe.zero_points != "integer" and recipe.weight_search == "builder" and recipe.precision == "int4":
        # Float minimums are written by edgekit's search only; the builder's quantizers store
        # integer zero points. (An fp32 bundle quantizes nothing, so there the key is moot.)
        raise BadInput(
            f'{where}: zero_points = {recipe.zero_points!r} needs weight_search = "edgekit", "imatrix" or "gptq"',
            'Set weight_search = "imatrix", or zero_points = "integer"',
        )
    return recipe


def builder_extra_options(recipe: OnnxRecipe, trust_remote_code: bool) -> dict[str, str]:
    """The one place the typed recipe becomes the builder's untyped extra_options strings.

    Not used on purpose: the builder's own `exclude_lm_head` / `exclude_embeds` REMOVE those
    layers from the graph (hidden states out, inputs_embeds in), which no generate loop can
    run. Keeping a layer in float is `nodes_to_exclude`.
    """
    opts = {
        "block_size": str(recipe.block_size),
        "accuracy_level": str(recipe.accuracy_level),
        "algo_config": recipe.algorithm,
        "is_symmetric": _flag(recipe.is_symmetric),
        "hf_token": "false",  # local directory: never look for hub credentials
        "hf_remote": _flag(trust_remote_code),  # trust_remote_code for every from_pretrained
    }
    exclude = []
    if recipe.float_lm_head:
        exclude.append("/lm_head/MatMul")
    if recipe.embeddings == "float":
        exclude.append("/model/embed_tokens/Gather")
    if exclude:
        opts["nodes_to_exclude"] = ",".join(exclude)
    # embeddings "int4" / "int8" are written by edgekit after the build (embedquant.py), not by
    # the builder's op_types_to_quantize=MatMul/Gather: that takes algorithm "default" only and
    # stores an ONNX int4 tensor, which onnxruntime 1.32's ORT format cannot load.
    return opts


def _flag(value: bool) -> str:
    return "true" if value else "false"
