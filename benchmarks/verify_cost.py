"""Wall time and peak RSS of `edgekit verify` on SmolLM2-135M, both formats, with the built-in
evaluation text and with a 4x longer one, reference cold (computed) and warm (cached).

Shows that windowed processing keeps memory bounded: peak RSS should barely move when the text
grows 4x, while wall time grows with it.

The long-context probe's cost (edgekit.longcontext: a prompt ending 64 tokens before the
original context, then 320 tokens one at a time): verify with the probe off and on, on
SmolLM2-135M (probed at 4096 with --long-context; it has no boundary of its own) and on the tiny
LongRoPE fixtures (phi3-longrope, phi4-mini), where it runs by default.

Writes benchmarks/results/verify_cost.{json,md} and the section (README.md or docs/*.md) between
<!-- verify-cost:start/end -->.

Rerun: .venv/bin/python benchmarks/verify_cost.py [--part short|long]   (default: both)
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
from _common import ROOT, host_facts, host_line, run_measured, update_doc, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAME = "verify_cost"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        choices=("all", "short", "long"),
        default="all",
        help="Which table to measure; the other is kept from the last results file.",
    )
    part = parser.parse_args().part
    previous = ROOT / "benchmarks" / "results" / f"{NAME}.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    facts = host_facts()
    today = str(dt.date.today())
    # Each table keeps the date and host it was measured on when the other is rerun.
    short = (
        {"rows": short_rows(), "date": today, "host": facts}
        if part in ("all", "short")
        else {"rows": old.get("rows", []), "date": old.get("date", "2026-11-23"), "host": old.get("host", facts)}
    )
    long = (
        {"rows": probe_rows(), "date": today, "host": facts}
        if part in ("all", "long")
        else {
            "rows": old.get("long_rows", []),
            "date": old.get("long_date", today),
            "host": old.get("long_host", facts),
        }
    )
    md = "\n".join(
        short_table(short["rows"], short["host"], short["date"])
        + [""]
        + long_table(long["rows"], long["host"], long["date"])
    )
    write_results(
        NAME,
        {
            "host": short["host"],
            "date": short["date"],
            "rows": short["rows"],
            "long_host": long["host"],
            "long_date": long["date"],
            "long_rows": long["rows"],
        },
        md,
    )
    update_doc("verify-cost", "## Verify cost\n\n" + md)
    print(md)


def _private_cache(work: Path) -> dict:
    """A private reference cache, so "cold" really computes the reference."""
    cache = work / "cache"
    shutil.copytree(Path(os.environ["EDGEKIT_CACHE"]) / "models", cache / "models")
    (cache / "llama.cpp").symlink_to(Path(os.environ["EDGEKIT_CACHE"]) / "llama.cpp")
    return {"EDGEKIT_CACHE": str(cache)}


def probe_rows() -> list[dict]:
    from edgekit import api
    from edgekit.tiny import make_tiny

    work = Path(tempfile.mkdtemp(prefix="edgekit-verify-cost-long-"))
    env = _private_cache(work)
    cli = str(Path(sys.executable).parent / "edgekit")
    models = {
        "smollm2-135m": ("smollm2-135m", ["--long-context"]),
        "tiny phi3-longrope": (str(make_tiny("phi3-longrope", work / "phi3-longrope")), []),
        "tiny phi4-mini": (str(make_tiny("phi4-mini", work / "phi4-mini")), []),
    }
    rows = []
    for label, (model, flags) in models.items():
        for fmt in ("gguf-q4_k_m", "onnx-int4"):
            bundle = work / f"{label.replace(' ', '-')}-{fmt}"
            api.export(model, fmt, bundle, verify=False)
            for probe in ("off", "on"):
                for state in ("cold", "warm"):
                    if state == "cold":
                        shutil.rmtree(Path(env["EDGEKIT_CACHE"]) / "reference", ignore_errors=True)
                    args = flags if probe == "on" else ["--no-long-context"]
                    m = run_measured([cli, "verify", str(bundle), "--json", "-q", *args], env=env)
                    if m.returncode not in (0, 3):
                        raise SystemExit(f"verify failed ({m.returncode}): {m.stderr[-2000:]}")
                    rep = json.loads(m.stdout)["reports"][0]
                    lc = rep.get("long_context")
                    rows.append(
                        {
                            "model": label,
                            "format": fmt,
                            "probe": probe,
                            "reference": state,
                            "wall_s": m.wall_s,
                            "peak_rss_mb": m.peak_rss_mb,
                            "positions": lc["positions"] if lc else 0,
                            "kld_after": lc["kld_mean_after"] if lc else None,
                            "parity_context": lc["parity_context"] if lc else None,
                        }
                    )
                    print(rows[-1], file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def long_table(rows: list[dict], facts: dict, date: str) -> list[str]:
    lines = [
        "### The long-context probe",
        "",
        f"Measured {date} on {host_line(facts)}: `edgekit verify` of default-recipe bundles with the probe "
        "off (`--no-long-context`) and on (SmolLM2 with `--long-context`; the LongRoPE fixtures by default). Positions: "
        "those the bundle could run (ONNX LongRoPE bundles stop at their 4096-token cap). The fixtures are int4 bundles "
        "of random weights: their KLD is large and says nothing about a real model (the rows are there for the cost; "
        "architecture parity is in Supported architectures).",
        "",
        "| model | format | probe | reference | positions | KLD past 4096 | parity to | wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kld = "" if r["kld_after"] is None else f"{r['kld_after']:.4f}"
        lines.append(
            f"| {r['model']} | {r['format']} | {r['probe']} | {r['reference']} | {r['positions'] or ''} | {kld} "
            f"| {r['parity_context'] or ''} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return lines


def short_rows() -> list[dict]:
    from edgekit import api
    from edgekit.reference import default_eval_text

    work = Path(tempfile.mkdtemp(prefix="edgekit-verify-cost-"))
    env = _private_cache(work)
    cache = Path(env["EDGEKIT_CACHE"])
    texts = {"1x": work / "eval1.txt", "4x": work / "eval4.txt"}
    base = default_eval_text()
    texts["1x"].write_text(base)
    texts["4x"].write_text("\n\n".join([base] * 4))
    rows = []
    cli = str(Path(sys.executable).parent / "edgekit")
    for fmt in ("gguf-q4_k_m", "onnx-int4"):
        bundle = work / fmt
        api.export("smollm2-135m", fmt, bundle, verify=False)
        for size, text in texts.items():
            for state in ("cold", "warm"):
                if state == "cold":
                    shutil.rmtree(cache / "reference", ignore_errors=True)
                m = run_measured([cli, "verify", str(bundle), "--eval-text", str(text), "--json", "-q"], env=env)
                if m.returncode not in (0, 3):
                    raise SystemExit(f"verify failed ({m.returncode}): {m.stderr[-2000:]}")
                rep = json.loads(m.stdout)["reports"][0]
                rows.append(
                    {
                        "format": fmt,
                        "text": size,
                        "reference": state,
                        "positions": rep["positions"],
                        "wall_s": m.wall_s,
                        "peak_rss_mb": m.peak_rss_mb,
                        "kld_mean": rep["kld_mean"],
                        "cached": rep["reference"]["cached"],
                    }
                )
                print(rows[-1], file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def short_table(rows: list[dict], facts: dict, date: str) -> list[str]:
    lines = [
        f"Measured {date} on {host_line(facts)}: `edgekit verify` on SmolLM2-135M, reference "
        "fp32 transformers, 512-token windows; cold = reference logits computed (and cached), warm = "
        "read from the cache. Peak RSS is the whole process tree. Rerun: `.venv/bin/python benchmarks/verify_cost.py`.",
        "",
        "| format | eval text | reference | positions | wall s | peak RSS MiB | kld_mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['text']} | {r['reference']}{'' if r['cached'] == (r['reference'] == 'warm') else ' (!)'} "
            f"| {r['positions']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['kld_mean']:.4f} |"
        )
    return lines


if __name__ == "__main__":
    main()
