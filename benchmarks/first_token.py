"""The first answer tokens of one chat prompt, in the float32 reference and in each bundle.

`make demo` asks every SmolLM2-135M bundle "What is the capital of France?". The gguf bundle
and the transformers reference answer "The capital of France is Paris."; the onnx-int4 bundles
answer "L'Étoile ...", although their parity figures are better than gguf's. This script shows
why, from the logits themselves:

* the prompt ids each runtime is fed, built exactly the way `edgekit run` builds them (the
  session's own chat_prompt_ids; the reference: transformers' apply_chat_template), and
  whether they are identical;
* along the reference's own greedy path (teacher-forced: each runtime is fed the reference's
  tokens, the way `Session.stepwise_logits` feeds an application's), the top-5 candidates and
  their logits at every step, the margin between top-1 and top-2, and the first step at which
  a runtime's argmax leaves the reference's path;
* each runtime's own free-running greedy answer, as `edgekit run` prints it.

Margins are differences of raw logits, which are differences of log-probabilities too (the
softmax normaliser cancels), so they compare across runtimes.

Writes benchmarks/results/first_token.{json,md}.

Rerun (bundles from `edgekit export smollm2-135m --target onnx-int4 / gguf-q4_k_m`):
    .venv/bin/python benchmarks/first_token.py dist/release/smollm2-135m-onnx-int4 \\
        dist/release/smollm2-135m-gguf-q4_k_m [--prompt TEXT] [--steps 8] [--max-tokens 48]
About a minute on 2 cores for SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, host_facts, host_line, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
NAME = "first_token"
DEMO_PROMPT = "What is the capital of France?"  # the Makefile's demo prompt
TOP = 5


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    # What edgekit.runbundle.run sends to session.chat_prompt_ids.
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _top(row: Any, tokenizer: Any, k: int = TOP) -> list[dict[str, Any]]:
    import numpy as np

    row = np.asarray(row, dtype=np.float32)
    order = np.argsort(-row, kind="stable")[:k]
    vocab = len(tokenizer)
    return [
        {"id": int(i), "text": tokenizer.decode([int(i)]) if i < vocab else f"<padded {i}>", "logit": float(row[i])}
        for i in order
    ]


def reference_side(bundle: Path, messages: list[dict[str, str]], steps: int, max_tokens: int) -> dict[str, Any]:
    """The float32 transformers reference from the checkpoint named in the bundle's manifest."""
    import torch

    from edgekit.bundle import read_manifest
    from edgekit.hftokenizer import load_tokenizer
    from edgekit.layerwise import resident_model
    from edgekit.reference import _greedy, reference_dtype
    from edgekit.verification import reference_checkpoint

    checkpoint = reference_checkpoint(read_manifest(bundle), None, True, False)
    tokenizer = load_tokenizer(checkpoint.path)
    ids = [int(t) for t in tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)]
    dtype = reference_dtype(checkpoint)
    model = resident_model(checkpoint, dtype, "eager")
    with torch.inference_mode():
        answer = _greedy(model, ids, max_tokens)  # the plain argmax loop verify uses; stops at EOS
        path = answer[:steps]
        # Teacher-forced over prompt + path: row i is the distribution the i-th answer token is
        # chosen from (the prompt's last position first).
        logits = model(torch.tensor([ids + path])).logits[0].float().numpy()
    rows = logits[len(ids) - 1 : len(ids) - 1 + max(1, len(path))]
    return {
        "checkpoint": str(checkpoint.path),
        "dtype": dtype,
        "tokenizer": tokenizer,
        "ids": ids,
        "path": path,
        "rows": rows,
        "answer_ids": answer,
        "answer": tokenizer.decode(answer, skip_special_tokens=True),
    }


def bundle_side(bundle: Path, messages: list[dict[str, str]], path: list[int], max_tokens: int) -> dict[str, Any]:
    """The bundle open in its own runtime through edgekit's session (edgekit.api.open_bundle)."""
    from edgekit.verification import open_bundle

    session, manifest = open_bundle(bundle)
    try:
        ids = [int(t) for t in session.chat_prompt_ids(messages)]
        # Rows: the prompt's last position, then one per path token but the last.
        rows = session.stepwise_logits(ids, path if path else [0])
        gen = session.generate(ids, max_tokens)
    finally:
        session.close()
    return {
        "format": manifest["format"],
        "ids": ids,
        "rows": rows,
        "answer_ids": list(gen.token_ids),
        "answer": gen.text,
    }


def step_record(row: Any, ref_token: int | None, tokenizer: Any, ref_pair: tuple[int, int] | None) -> dict[str, Any]:
    top = _top(row, tokenizer)
    rec: dict[str, Any] = {"top": top, "margin": round(top[0]["logit"] - top[1]["logit"], 4)}
    if ref_pair is not None:
        # The reference's top-1 minus top-2 candidates, as this runtime scores those two tokens:
        # how far quantization moved the one difference a greedy choice turns on.
        rec["ref_pair_margin"] = round(float(row[ref_pair[0]]) - float(row[ref_pair[1]]), 4)
    if ref_token is not None:
        # How far this runtime's own top-1 is above the reference's choice (0 when they agree).
        rec["gap_to_ref_choice"] = round(top[0]["logit"] - float(row[ref_token]), 4)
        rec["agrees"] = top[0]["id"] == ref_token
    return rec


def measure(bundles: list[Path], prompt: str, system: str | None, steps: int, max_tokens: int) -> dict[str, Any]:
    messages = _messages(prompt, system)
    ref = reference_side(bundles[0], messages, steps, max_tokens)
    tokenizer = ref["tokenizer"]
    path = ref["path"]
    runtimes: list[dict[str, Any]] = []
    pairs = [tuple(int(t) for t in (-row).argsort(kind="stable")[:2]) for row in ref["rows"]]

    def add(name: str, side: dict[str, Any]) -> None:
        n = min(len(side["rows"]), max(1, len(path)))
        recs = [step_record(side["rows"][i], path[i] if i < len(path) else None, tokenizer, pairs[i]) for i in range(n)]
        first_off = next((i for i, r in enumerate(recs) if r.get("agrees") is False), None)
        runtimes.append(
            {
                "name": name,
                "ids": side["ids"],
                "ids_equal_reference": side["ids"] == ref["ids"],
                "steps": recs,
                "first_divergence": first_off,
                "answer": side["answer"],
                "answer_ids": side["answer_ids"],
            }
        )

    add(f"reference (transformers, {ref['dtype']})", ref)
    for b in bundles:
        side = bundle_side(b, messages, path, max_tokens)
        add(f"{side['format']} ({b.name})", side)
    return {
        "prompt": prompt,
        "system": system,
        "messages": messages,
        "checkpoint": ref["checkpoint"],
        "prompt_text": tokenizer.decode(ref["ids"]),
        "reference_path": [{"id": t, "text": tokenizer.decode([t])} for t in path],
        "runtimes": runtimes,
    }


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("edgekit", "torch", "transformers", "onnxruntime-genai", "onnxruntime", "llama-cpp-python"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _cell(t: dict[str, Any]) -> str:
    return f"`{t['text']!r}` {t['logit']:.3f}"


def markdown(doc: dict[str, Any]) -> str:
    r = doc["result"]
    ref = r["runtimes"][0]
    lines = [
        "# First answer tokens: reference vs bundles",
        "",
        f"Taken {doc['date']} on {host_line(doc['host'])}; "
        + ", ".join(f"{k} {v}" for k, v in doc["tools"].items())
        + ".",
        f"Generated by `{doc['command']}`.",
        "",
        f"Prompt: {r['prompt']!r} (system: {r['system']!r}), chat template applied as `edgekit run` does. "
        f"Reference checkpoint: `{r['checkpoint']}`.",
        "",
        "## Prompt ids",
        "",
        f"{len(ref['ids'])} ids, rendered: `{r['prompt_text']!r}`",
        "",
        "| runtime | ids identical to the reference's |",
        "|---|---|",
    ]
    lines += [
        f"| {rt['name']} | {'yes' if rt['ids_equal_reference'] else 'NO: ' + str(rt['ids'])} |" for rt in r["runtimes"]
    ]
    lines += [
        "",
        "## Free-running greedy answers (what `edgekit run` prints)",
        "",
        "| runtime | answer |",
        "|---|---|",
    ]
    lines += [f"| {rt['name']} | {rt['answer']!r} |" for rt in r["runtimes"]]
    lines += [
        "",
        "## Margins along the reference's greedy path",
        "",
        "Each runtime is fed the prompt, then the reference's tokens one by one. margin = top-1 "
        "logit minus top-2 logit; gap = the runtime's top-1 logit minus its logit for the "
        "reference's token (0 where it agrees).",
        "",
    ]
    header = "| step | ref token | " + " | ".join(rt["name"] for rt in r["runtimes"]) + " |"
    lines += [header, "|---" * (2 + len(r["runtimes"])) + "|"]
    for i, tok in enumerate(r["reference_path"]):
        cells = []
        for rt in r["runtimes"]:
            s = rt["steps"][i] if i < len(rt["steps"]) else None
            if s is None:
                cells.append("")
            elif s.get("agrees", True):
                cells.append(f"margin {s['margin']:.3f}")
            else:
                cells.append(f"**{s['top'][0]['text']!r}** (gap {s['gap_to_ref_choice']:.3f})")
        lines.append(f"| {i} | `{tok['text']!r}` | " + " | ".join(cells) + " |")
    lines += ["", "## Top-5 at the first answer position", ""]
    lines += [
        "| rank | " + " | ".join(rt["name"] for rt in r["runtimes"]) + " |",
        "|---" * (1 + len(r["runtimes"])) + "|",
    ]
    for k in range(TOP):
        lines.append(f"| {k + 1} | " + " | ".join(_cell(rt["steps"][0]["top"][k]) for rt in r["runtimes"]) + " |")
    lines += ["", "## Reading", ""]
    from edgekit.runbundle import NEAR_TIE  # what `edgekit run --reference` calls a near-tie

    margin0 = ref["steps"][0]["margin"]
    lines.append(
        f"The reference's own first answer token wins by {margin0:.3f} logits over the runner-up "
        f"`{ref['steps'][0]['top'][1]['text']!r}`"
        + (
            f" (a near-tie: under {NEAR_TIE} logits, within what 4-bit rounding moves such a difference by: see the last point)."
            if margin0 < NEAR_TIE
            else "."
        )
    )
    for rt in r["runtimes"][1:]:
        i = rt["first_divergence"]
        if i is None:
            lines.append(f"- {rt['name']}: follows the reference's path for all {len(rt['steps'])} steps compared.")
        else:
            lines.append(
                f"- {rt['name']}: leaves it at step {i}, where the reference's margin is "
                f"{ref['steps'][i]['margin']:.3f} and the bundle prefers "
                f"`{rt['steps'][i]['top'][0]['text']!r}` by {rt['steps'][i]['gap_to_ref_choice']:.3f}."
            )
    shifts = [
        abs(s["ref_pair_margin"] - ref["steps"][i]["ref_pair_margin"])
        for rt in r["runtimes"][1:]
        for i, s in enumerate(rt["steps"])
    ]
    if shifts:
        lines.append(
            f"- Over the {len(ref['steps'])} steps, the bundles move the difference between the reference's top two "
            f"candidates by {min(shifts):.3f} to {max(shifts):.3f} logits (median "
            f"{sorted(shifts)[len(shifts) // 2]:.3f})."
        )
    off = [rt for rt in r["runtimes"][1:] if rt["first_divergence"] is not None]
    if off:
        lines += ["", "## Top-5 where a bundle first leaves the reference's path", ""]
        for rt in off:
            i = rt["first_divergence"]
            lines.append(
                f"- {rt['name']}, step {i}: reference "
                + ", ".join(_cell(t) for t in ref["steps"][i]["top"])
                + f" (margin {ref['steps'][i]['margin']:.3f}); bundle "
                + ", ".join(_cell(t) for t in rt["steps"][i]["top"])
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path, help="bundle directories of one checkpoint")
    ap.add_argument("--prompt", default=DEMO_PROMPT)
    ap.add_argument("--system", default=None, help="system message (default: none, as in the demo)")
    ap.add_argument("--steps", type=int, default=8, help="answer positions to compare along the reference path")
    ap.add_argument("--max-tokens", type=int, default=48, help="free-running answer length (the demo's 48)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    args = ap.parse_args(argv)
    result = measure(args.bundles, args.prompt, args.system, args.steps, args.max_tokens)
    cmd = " ".join(["benchmarks/first_token.py", *(str(b) for b in args.bundles)])
    if args.prompt != DEMO_PROMPT:
        cmd += f" --prompt {args.prompt!r}"
    doc = {
        "date": dt.date.today().isoformat(),
        "host": host_facts(),
        "tools": _tool_versions(),
        "command": cmd,
        "result": result,
    }
    md = markdown(doc)
    print(md)
    if not args.no_write:
        write_results(NAME, doc, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
