"""Cost of a release build: `edgekit build` on SmolLM2-135M in both formats on laptop-cpu,
then the same config again (every entry reused), then --force (every entry rebuilt).

Reports wall time and peak RSS of the whole build (process tree) per run, the per-entry
export / verify / bench split, and whether the rebuilt model files are byte-identical.
Writes benchmarks/results/build_matrix.{json,md} and the section (README.md or docs/*.md) between
<!-- build-matrix:start/end -->.

Rerun: .venv/bin/python benchmarks/build_matrix.py
"""

from __future__ import annotations

import datetime as dt
import hashlib
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
NAME = "build_matrix"
CONFIG = """\
[build]
formats = ["gguf-q4_k_m", "onnx-int4"]
profiles = ["laptop-cpu"]
reps = 3

[[model]]
source = "smollm2-135m"
"""


def _model_digests(out: Path, summary: dict) -> dict[str, str]:
    digests = {}
    for e in summary["entries"]:
        for rel in e.get("reproducible_files", []):
            digests[f"{e['bundle']}/{rel}"] = hashlib.sha256((out / e["bundle"] / rel).read_bytes()).hexdigest()
    return digests


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="edgekit-build-bench-"))
    cfg = work / "edgekit.toml"
    cfg.write_text(CONFIG)
    out = work / "dist"
    cli = str(Path(sys.executable).parent / "edgekit")
    runs, digests = [], []
    for label, extra in (("first build", []), ("unchanged (reused)", []), ("--force", ["--force"])):
        m = run_measured([cli, "build", "--config", str(cfg), "--out", str(out), "--json", "-q", *extra])
        if m.returncode != 0:
            raise SystemExit(f"build failed ({m.returncode}): {m.stderr[-2000:]}")
        summary = json.loads(m.stdout)
        digests.append(_model_digests(out, summary))
        runs.append(
            {
                "run": label,
                "wall_s": round(m.wall_s, 1),
                "peak_rss_mb": round(m.peak_rss_mb),
                "entries": [
                    {
                        "id": e["id"],
                        "reused": e["reused"],
                        "status": e["status"],
                        **e["timings"],
                        "kld_mean": e["parity"]["kld_mean"],
                        "decode_tok_s": e["bench"][0]["decode_tok_s"] if e["bench"] else None,
                    }
                    for e in summary["entries"]
                ],
            }
        )
        print(runs[-1], file=sys.stderr)
    identical = digests[0] == digests[2]
    shutil.rmtree(work, ignore_errors=True)
    facts = host_facts()
    lines = [
        f"Measured {dt.date.today()} on {host_line(facts)}: `edgekit build` of SmolLM2-135M x "
        "{gguf-q4_k_m, onnx-int4} on laptop-cpu (3 bench reps), each entry in its own process. "
        "Wall time and peak RSS are the whole build's process tree. "
        "Rerun: `.venv/bin/python benchmarks/build_matrix.py`.",
        "",
        "| run | build wall s | build peak RSS MiB | entry | reused | export s | verify s | bench s | entry total s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for e in r["entries"]:
            lines.append(
                f"| {r['run']} | {r['wall_s']} | {r['peak_rss_mb']} | {e['id']} | {'yes' if e['reused'] else 'no'} "
                f"| {e.get('export_s', '-')} | {e.get('verify_s', '-')} | {e.get('bench_s', '-')} | {e.get('total_s', '-')} |"
            )
    lines += [
        "",
        f"Model files after `--force` byte-identical to the first build: **{'yes' if identical else 'no'}** "
        f"({len(digests[0])} files compared).",
    ]
    md = "\n".join(lines)
    write_results(NAME, {"host": facts, "runs": runs, "reproducible": identical, "files": digests[0]}, md)
    update_doc("build-matrix", "### What a build costs\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
