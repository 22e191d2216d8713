"""What computing the reference in bf16 instead of fp32 costs in accuracy, and what the
streamed (block by block) reference costs in time and memory, on SmolLM2-135M.

Since issue 12 the reference runs in the checkpoint's own dtype: a bf16 checkpoint is no longer
upcast to an fp32 copy twice its size. The question is whether that moves the parity figures.
Same weights both ways: SmolLM2 rounded to bf16 once (checkpoint B), and B upcast exactly to
fp32 (checkpoint F). ref(F) in fp32 vs ref(B) in bf16 is then the floor a bf16 reference adds
to every KLD a bundle is measured with (teacher-forced on the default evaluation text, the
windows `edgekit verify` uses), to compare with the Q4 bundles' KLDs (~0.04-0.07) and the
targets' kld_mean_max. Each (dtype, mode) runs in its own interpreter with an empty cache;
wall time and process-tree peak RSS are sampled the same way for all four.

Writes benchmarks/results/reference_dtype.{json,md} and docs/reference-dtype.md.

Rerun: .venv/bin/python benchmarks/reference_dtype.py      (about 3-5 min on 2 cores)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, host_facts, host_line, run_measured, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAME = "reference_dtype"
DOC = ROOT / "docs" / "reference-dtype.md"
COMMAND = ".venv/bin/python benchmarks/reference_dtype.py"

CHILD = """
import json, sys
from edgekit.checkpoint import resolve
from edgekit.parity import GREEDY_PROMPTS, GREEDY_TOKENS
from edgekit.reference import build_reference, default_eval_text
ref = build_reference(resolve(sys.argv[1]), default_eval_text(), GREEDY_PROMPTS, GREEDY_TOKENS)
print(json.dumps({"dir": str(ref.directory), "windows": len(ref.windows), "dtype": ref.dtype, "mode": ref.mode,
                  "greedy": ref.greedy, "cached": ref.cached}))
"""


def copy_as(src: Path, dst: Path, dtype) -> Path:
    """src with every floating tensor cast to dtype (config's torch_dtype to match)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file(
            {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(f)).items()},
            str(f),
            metadata={"format": "pt"},
        )
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    config.pop("dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def run(path: Path, mode: str, cache: Path) -> dict:
    m = run_measured(
        [sys.executable, "-c", CHILD, str(path)],
        env={"EDGEKIT_CACHE": str(cache), "EDGEKIT_REFERENCE": mode, "PYTHONPATH": str(ROOT)},
    )
    if m.returncode != 0:
        raise SystemExit(f"[{NAME}] reference ({mode}) failed:\n{m.stderr[-3000:]}")
    out = json.loads(m.stdout.strip().splitlines()[-1])
    return {**out, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb}


def logits(run_: dict):
    import numpy as np

    d = Path(run_["dir"])
    return [np.load(d / f"window_{i:04d}.npy") for i in range(run_["windows"])]


def compare(ref_run: dict, got_run: dict, windows) -> dict:
    import numpy as np

    from edgekit.metrics import greedy_match, position_stats

    ref = np.concatenate([w[:-1] for w in logits(ref_run)])
    got = np.concatenate([w[:-1] for w in logits(got_run)])
    targets = np.concatenate([np.asarray(w[1:]) for w in windows])
    s = position_stats(ref, got, targets)
    greedy = [greedy_match(ref_run["greedy"][p], got_run["greedy"][p]) for p in ref_run["greedy"]]
    return {
        "positions": int(len(targets)),
        "kld_mean": float(s.kld.mean()),
        "kld_p99": float(np.quantile(s.kld, 0.99)),
        "kld_max": float(s.kld.max()),
        "top1_agreement": float(s.top1_same.mean()),
        "max_abs_logit_diff": float(np.abs(ref - got).max()),
        "greedy_match_tokens_mean": sum(greedy) / len(greedy),
        "greedy_prompts": len(greedy),
    }


def thresholds(name: str) -> dict:
    """target -> its [thresholds] `name` (kld_mean_max, top1_agreement_min)."""
    import tomllib

    out = {}
    for f in sorted((ROOT / "edgekit" / "data" / "targets").glob("*.toml")):
        value = tomllib.loads(f.read_text()).get("thresholds", {}).get(name)
        if value is not None:
            out[f.stem] = value
    return out


def main() -> None:
    if "--render" in sys.argv[1:]:  # rewrite the markdown from the last results
        doc = json.loads((ROOT / "benchmarks" / "results" / f"{NAME}.json").read_text())
        doc.update(kld_mean_max=thresholds("kld_mean_max"), top1_agreement_min=thresholds("top1_agreement_min"))
        publish(doc)
        return
    import torch

    from edgekit.checkpoint import resolve
    from edgekit.embedded import ensure_checkpoint
    from edgekit.hftokenizer import load_tokenizer
    from edgekit.parity import GREEDY_TOKENS
    from edgekit.reference import (
        DEFAULT_WINDOW,
        default_eval_text,
        tokenizer_bos,
        windows_of,
    )

    original = ensure_checkpoint("smollm2-135m")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgekit-refdtype-") as tmp:
        tmp = Path(tmp)
        b = copy_as(original, tmp / "smollm2-bf16", torch.bfloat16)
        f = copy_as(b, tmp / "smollm2-bf16-as-fp32", torch.float32)  # exact upcast: the same weights
        runs = {}
        for label, path in (("fp32", f), ("bf16", b)):
            for mode in ("memory", "stream"):
                print(f"[{NAME}] {label} {mode}", file=sys.stderr)
                runs[f"{label}-{mode}"] = run(path, mode, tmp / f"cache-{label}-{mode}")
        tok = load_tokenizer(original)
        windows = windows_of(
            tok(default_eval_text(), add_special_tokens=False).input_ids, DEFAULT_WINDOW, tokenizer_bos(tok)
        )
        floor = compare(runs["fp32-memory"], runs["bf16-stream"], windows)
        same_fp32 = compare(runs["fp32-memory"], runs["fp32-stream"], windows)
        same_bf16 = compare(runs["bf16-memory"], runs["bf16-stream"], windows)
        resolve(str(b))  # the copies are valid checkpoints (raises otherwise)
    load_after = os.getloadavg()
    doc = {
        "date": dt.date.today().isoformat(),
        "host": host_facts(),
        "load_avg_before": load,
        "load_avg_after": load_after,
        "model": "smollm2-135m",
        "runs": {
            k: {kk: v[kk] for kk in ("dtype", "mode", "wall_s", "peak_rss_mb", "windows")} for k, v in runs.items()
        },
        "bf16_vs_fp32": floor,
        "stream_vs_memory_fp32": same_fp32,
        "stream_vs_memory_bf16": same_bf16,
        "kld_mean_max": thresholds("kld_mean_max"),
        "top1_agreement_min": thresholds("top1_agreement_min"),
        "greedy_tokens": GREEDY_TOKENS,
    }
    publish(doc)


def publish(doc: dict) -> None:
    md = render(doc)
    write_results(NAME, doc, md)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(md + "\n")
    print(md)


def render(doc: dict) -> str:
    r, fl = doc["runs"], doc["bf16_vs_fp32"]
    lowest = min(doc["kld_mean_max"].values())
    lines = [
        "# Reference dtype: bf16 vs fp32, streamed vs in memory",
        "",
        f"Measured {doc['date']} on {host_line(doc['host'])}; load average {doc['load_avg_before'][0]:.1f} before, "
        f"{doc['load_avg_after'][0]:.1f} after (other jobs shared the machine: wall times are indicative).",
        f"Command: `{COMMAND}`. Model: SmolLM2-135M rounded once to bf16; the fp32 side is that bf16 checkpoint "
        "upcast exactly, so both sides have the same weights and differ only in the arithmetic.",
        "",
        "## The floor a bf16 reference adds",
        "",
        "| | value |",
        "|---|---|",
        f"| positions (default eval text, {r['fp32-memory']['windows']} windows) | {fl['positions']} |",
        f"| KLD mean, bf16 reference vs fp32 | {fl['kld_mean']:.5f} |",
        f"| KLD p99 / max | {fl['kld_p99']:.5f} / {fl['kld_max']:.5f} |",
        f"| top-1 agreement | {fl['top1_agreement']:.4f} |",
        f"| greedy continuation, matching tokens (mean of {fl['greedy_prompts']} prompts, of {doc['greedy_tokens']}) | "
        f"{fl['greedy_match_tokens_mean']:.1f} |",
        f"| max abs logit difference | {fl['max_abs_logit_diff']:.3f} |",
        "",
        "## Cost of each mode",
        "",
        "| reference | wall s | process peak RSS MB |",
        "|---|---|---|",
        *[f"| {v['dtype']}, {v['mode']} | {v['wall_s']:.1f} | {v['peak_rss_mb']:.0f} |" for v in r.values()],
        "",
        f"Streamed vs in memory, same dtype: max abs logit difference {doc['stream_vs_memory_fp32']['max_abs_logit_diff']:.2g} "
        f"(fp32), {doc['stream_vs_memory_bf16']['max_abs_logit_diff']:.2g} (bf16); top-1 agreement "
        f"{doc['stream_vs_memory_fp32']['top1_agreement']:.4f} / {doc['stream_vs_memory_bf16']['top1_agreement']:.4f}.",
        "At 135M the whole model is small next to transformers' own footprint, so the streamed peak is "
        "not much lower; the streamed reference's saving grows with the model (tests/test_layerwise.py "
        "shows its peak does not grow with the number of blocks).",
        "",
        "## Do the parity thresholds need to change?",
        "",
        f"kld_mean_max of the targets: {', '.join(f'{k} {v}' for k, v in doc['kld_mean_max'].items())}. "
        f"The bf16 floor ({fl['kld_mean']:.4f}) is {fl['kld_mean'] / lowest:.1%} of the lowest of them and "
        f"{fl['kld_mean'] / 0.04:.1%} of the smallest Q4 bundle KLD seen (~0.04). "
        + (
            "KLDs add roughly (the floor is independent rounding noise), so a Q4 bundle measured against a bf16 "
            "reference reads about that much higher: no threshold needs to change."
            if fl["kld_mean"] < 0.05 * lowest
            else "That is large enough to move pass/fail near the limit: the thresholds should be revisited."
        ),
        "",
        f"top1_agreement_min: {', '.join(f'{k} {v}' for k, v in doc['top1_agreement_min'].items())}. "
        f"The bf16 reference disagrees with the fp32 one on the top token at {1 - fl['top1_agreement']:.1%} of the "
        "positions (near-ties the bf16 rounding flips); a bundle's agreement against it can read up to that much "
        f"lower, which against a bar of {min(doc['top1_agreement_min'].values()):.0%} and Q4 bundles at 84-89 % "
        "leaves the pass/fail of every bundle measured so far unchanged. A bundle within a point or two of the bar "
        "could flip: such a bundle is a borderline one either way.",
        "",
        "The wall times were taken with the machine shared by other jobs (load average far above its 2 cores): "
        "their ratios, not their values, are the figure. The streamed mode reads every block from the "
        "safetensors once for the text and once per generated greedy token (24 passes, all prompts together) "
        "where the in-memory one loads the model once; it only runs where the model would not fit comfortably "
        "in memory (edgekit.layerwise.STREAM_SHARE), which at 135M it always does.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
