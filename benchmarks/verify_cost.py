"""Wall time and peak RSS of `edgekit verify` on SmolLM2-135M, both formats, with the built-in
evaluation text and with a 4x longer one, reference cold (computed) and warm (cached).

Shows that windowed processing keeps memory bounded: peak RSS should barely move when the text
grows 4x, while wall time grows with it. Writes benchmarks/results/verify_cost.{json,md} and the
README section between <!-- verify-cost:start/end -->.

Rerun: .venv/bin/python benchmarks/verify_cost.py
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
from _common import ROOT, host_facts, host_line, run_measured, update_readme, write_results  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAME = "verify_cost"


def main() -> None:
    from edgekit import api
    from edgekit.reference import default_eval_text

    work = Path(tempfile.mkdtemp(prefix="edgekit-verify-cost-"))
    # A private reference cache, so "cold" really computes the reference.
    cache = work / "cache"
    shutil.copytree(Path(os.environ["EDGEKIT_CACHE"]) / "models", cache / "models")
    (cache / "llama.cpp").symlink_to(Path(os.environ["EDGEKIT_CACHE"]) / "llama.cpp")
    env = {"EDGEKIT_CACHE": str(cache)}
    os.environ["EDGEKIT_CACHE"] = str(cache)
    texts = {"1x": work / "eval1.txt", "4x": work / "eval4.txt"}
    base = default_eval_text()
    texts["1x"].write_text(base)
    texts["4x"].write_text("\n\n".join([base] * 4))
    rows = []
    cli = str(Path(sys.executable).parent / "edgekit")
    for fmt in ("gguf-q4_k_m", "onnx-int4"):
        bundle = work / fmt
        api.export("smollm2-135m", fmt, bundle)
        for size, text in texts.items():
            for state in ("cold", "warm"):
                if state == "cold":
                    shutil.rmtree(cache / "reference", ignore_errors=True)
                m = run_measured([cli, "verify", str(bundle), "--eval-text", str(text), "--json", "-q"], env=env)
                if m.returncode not in (0, 3):
                    raise SystemExit(f"verify failed ({m.returncode}): {m.stderr[-2000:]}")
                rep = json.loads(m.stdout)["reports"][0]
                rows.append({"format": fmt, "text": size, "reference": state, "positions": rep["positions"],
                             "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, "kld_mean": rep["kld_mean"],
                             "cached": rep["reference"]["cached"]})
                print(rows[-1], file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    facts = host_facts()
    lines = [
        f"Measured {dt.date.today()} on {host_line(facts)}: `edgekit verify` on SmolLM2-135M, reference "
        "fp32 transformers, 512-token windows; cold = reference logits computed (and cached), warm = "
        "read from the cache. Peak RSS is the whole process tree. Rerun: `.venv/bin/python benchmarks/verify_cost.py`.",
        "",
        "| format | eval text | reference | positions | wall s | peak RSS MiB | kld_mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['format']} | {r['text']} | {r['reference']}{'' if r['cached'] == (r['reference'] == 'warm') else ' (!)'} "
                     f"| {r['positions']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['kld_mean']:.4f} |")
    md = "\n".join(lines)
    write_results(NAME, {"host": facts, "rows": rows}, md)
    update_readme("verify-cost", "## Verify cost\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
