"""Bundle files beyond the weights: genai_config.json, tokenizer and chat template, context length."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ToolFailed
from .architectures import GENAI_DECODER_TYPES

if TYPE_CHECKING:
    import onnx

    from ...checkpoint import Checkpoint

TOKENIZER_EXTRAS = ("tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """model.onnx + one model.onnx.data, as the bundle expects. onnx appends to an existing
    data file, so an old one is removed first (the model must be fully in memory)."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=0
    )
    os.chmod(data, 0o644)  # onnx writes it 0600, unlike every other bundle file


def longrope_switch(config: dict[str, Any]) -> int | None:
    """The original context where LongRoPE switches from its short to its long factors, or
    None: onnxruntime-genai leaves transformers' behaviour there (LONG_CONTEXT_LIMITS)."""
    cfg = config.get("text_config") or config
    scaling = cfg.get("rope_scaling") or {}
    original = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    if (
        "short_factor" in scaling
        and "long_factor" in scaling
        and original
        and (cfg.get("max_position_embeddings") or 0) > original
    ):
        return int(original)
    return None


def set_context_length(config: dict[str, Any], genai_config: Path, wanted: int) -> tuple[int, str | None]:
    """Write the bundle's context (model.context_length and search.max_length, which
    onnxruntime-genai enforces) and return it with a note when it is not the model's own."""
    genai = json.loads(genai_config.read_text(encoding="utf-8"))
    model_context = int(genai["model"]["context_length"])
    switch = longrope_switch(config)
    note = None
    if wanted:
        context = wanted
        if switch and wanted > switch:
            note = (
                f"context_length {wanted} is past LongRoPE's switch at {switch} tokens, where onnxruntime-genai "
                "0.15.2 keeps the short-factor KV cache and leaves transformers' behaviour"
            )
    elif switch and switch < model_context:
        context = switch
        note = (
            f"context capped at {switch} tokens (of the model's {model_context}): past LongRoPE's switch "
            "onnxruntime-genai 0.15.2 keeps the short-factor KV cache and leaves transformers' behaviour; "
            "--set context_length=N lifts the cap"
        )
    else:
        context = model_context
    if context != model_context:
        genai["model"]["context_length"] = context
        genai.setdefault("search", {})["max_length"] = context
        genai_config.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    return context, note


def complete_bundle_files(checkpoint: Checkpoint, staging: Path) -> list[str]:
    """Chat template in tokenizer_config.json and chat_template.jinja, generation_config.json.

    transformers 4.57 saves the template only as chat_template.jinja; onnxruntime-genai 0.15.2
    reads tokenizer_config.json's chat_template first and transformers prefers the .jinja
    file, so both must exist and agree or the two runtimes render different prompts.
    """
    notes = []
    for name in TOKENIZER_EXTRAS:  # the builder re-saves the tokenizer; keep what it dropped
        if (checkpoint.path / name).is_file() and not (staging / name).exists():
            shutil.copy2(checkpoint.path / name, staging / name)
    tc_path = staging / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    template = _chat_template(staging) or _chat_template(checkpoint.path)
    if template is None:
        notes.append("the checkpoint has no chat template: use raw prompts with this bundle")
    else:
        tc["chat_template"] = template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if isinstance(template, str):
            (staging / "chat_template.jinja").write_text(template, encoding="utf-8")
    gen = staging / "generation_config.json"
    if not gen.exists():
        if (checkpoint.path / "generation_config.json").is_file():
            shutil.copy2(checkpoint.path / "generation_config.json", gen)
        else:
            keys = ("bos_token_id", "eos_token_id", "pad_token_id")
            gen.write_text(json.dumps({k: checkpoint.config.get(k) for k in keys}, indent=2) + "\n")
    return notes


def _chat_template(directory: Path) -> str | list | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        return json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
    return None


def write_genai_config(checkpoint: Checkpoint, staging: Path) -> None:
    """genai_config.json for an optimum graph: names and shapes read from the graph itself."""
    import onnx

    graph = onnx.load(str(staging / "model.onnx"), load_external_data=False).graph
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    past_keys = sorted(n for n in shapes if re.fullmatch(r"past_key_values\.\d+\.key", n))
    if not past_keys or any(len(shapes[k]) != 4 or not isinstance(shapes[k][1], int) for k in past_keys):
        raise ToolFailed(
            "the exported graph's KV cache is not [batch, heads, seq, head_dim] per layer",
            "onnxruntime-genai cannot drive it; use the gguf-q4_k_m target",
        )
    cfg = checkpoint.config.get("text_config") or checkpoint.config
    gen_path = checkpoint.path / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    wanted = ("input_ids", "attention_mask", "position_ids")
    inputs = {n: n for n in wanted if n in shapes}
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    model_type = cfg.get("model_type", "")
    config = {
        "model": {
            "type": model_type if model_type in GENAI_DECODER_TYPES else "llama",
            "bos_token_id": gen.get("bos_token_id", cfg.get("bos_token_id", 1)),
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "vocab_size": cfg["vocab_size"],
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": shapes[past_keys[0]][3],
                "hidden_size": cfg.get("hidden_size") or cfg.get("n_embd"),
                "num_attention_heads": cfg.get("num_attention_heads") or cfg.get("n_head"),
                "num_key_value_heads": shapes[past_keys[0]][1],
                "num_hidden_layers": len(past_keys),
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        # optimum's graph concatenates past and new keys, so the cache cannot share a buffer.
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": context,
            "min_length": 0,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
    (staging / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def weight_summary(model_path: Path) -> dict[str, Any]:
    """What precision the weights ended in, read from the graph (not from the request)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    summary: dict[str, Any] = {"matmul_int4": 0, "matmul_int8": 0, "matmul_float": [], "embedding": "none"}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            summary[f"matmul_int{bits}"] = summary.get(f"matmul_int{bits}", 0) + 1
        elif node.op_type == "MatMul" and node.name.endswith("/BlockMinimums/MatMul"):
            pass  # the float minimums of an int4 MatMulNBits (zero_points = "float_matmul"), not a weight
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            summary["matmul_float"].append(node.name)
        elif node.op_type == "GatherBlockQuantized":
            # a tied embedding reads the lm_head's codes: int8 when the lm_head is int8
            summary["embedding"] = f"int{next((a.i for a in node.attribute if a.name == 'bits'), 4)}"
        elif node.op_type == "Gather" and node.input[0] in inits and "embed" in node.name:
            summary["embedding"] = "float"
    return summary


def weight_notes(weights: dict[str, Any]) -> list[str]:
    notes = []
    if weights["matmul_int8"]:
        notes.append(
            f"{weights['matmul_int8']} of {weights['matmul_int4'] + weights['matmul_int8']} "
            "quantized MatMuls are int8 (recipe)"
        )
    if weights["matmul_float"]:
        names = ", ".join(weights["matmul_float"][:3])
        notes.append(f"{len(weights['matmul_float'])} MatMul weights stay float ({names})")
    if weights["embedding"] == "float":
        notes.append("token embedding stays float")
    return notes
