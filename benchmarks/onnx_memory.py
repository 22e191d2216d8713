"""Time and process-tree peak RSS of edgekit's onnx-int4 export (streamed) vs the raw genai builder.

    python benchmarks/onnx_memory.py smollm2-135m          # streamed vs whole-model edgekit export
    python benchmarks/onnx_memory.py llama-3.2-1b [--cap-gb 16] [--work DIR] [--layers 4]

smollm2-135m: edgekit's default recipe both ways (the streamed path, and the whole-model
builder path it replaces), with a check that the two bundles' model files are byte-identical.
A random-weight model (llama-3.2-1b, phi3-mini, ... as benchmarks/_scale_models.py defines them,
written tensor by tensor, bf16): the raw builder
(`python -m onnxruntime_genai.models.builder -i CKPT -o OUT -p int4 -e cpu
--extra_options algo_config=k_quant_mixed`, the algorithm edgekit starts from) and
edgekit's default-recipe export (importance matrix included).

Each step runs in a fresh process; its whole process tree is sampled every 0.1 s
(edgekit.measure.PeakRSS) and killed when it passes --cap-gb, so a run never takes the machine
down. Results go to benchmarks/results/onnx_memory.md with the machine and its load.

    python benchmarks/onnx_memory.py smollm2-135m --code before=/tmp/a --code after=/tmp/b

--code LABEL=DIR (repeated): the streamed export alone (no verify) once per edgekit source tree,
DIR first on PYTHONPATH, each with a fresh cache (so its importance-matrix pass runs), the
checkpoint shared. Per tree: wall, the export process tree's peak RSS and, sampled from
/proc/<pid>/status, its peak RssAnon (heap) and RssFile (mapped files, such as the checkpoint's
safetensors); then whether every tree wrote the same model files. --warm-imatrix computes the
importance matrix once beforehand so every run finds it cached and the peak is the export's
own (template, re-quantization, writing). Make the trees with `git archive <commit> | tar -x -C DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from edgekit.checkpoint import sha256_file  # noqa: E402 - after the sys.path lines above, like the other scripts
from edgekit.measure import PeakRSS  # noqa: E402

MODEL_FILES = ("model.onnx", "model.onnx.data", "genai_config.json")
EXPORT = (
    "import sys, json; from edgekit import api; "
    "r = api.export(sys.argv[1], 'onnx-int4', sys.argv[2], force=True, recipe=json.loads(sys.argv[3])); "
    "print('path_taken', r[0].path_taken)"
)


def run(name: str, argv: list[str], cap_gb: float, env: dict[str, str] | None = None) -> dict:
    """Run argv with its process tree watched; kill the tree above cap_gb."""
    import psutil

    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"onnx_memory-{name}.log"
    with open(log, "wb") as out, PeakRSS() as peak:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        killed = False
        while proc.poll() is None:
            if peak.peak_bytes > cap_gb * 2**30 and not killed:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                killed = True
            time.sleep(0.2)
    return {
        "step": name,
        "wall_s": round(peak.wall_s, 1),
        "peak_gib": round(peak.peak_bytes / 2**30, 2),
        "returncode": proc.returncode,
        "killed_at_cap": killed,
        "log": str(log),
    }


def edgekit_export(name: str, ckpt: str, out: Path, cap_gb: float, whole_model: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    # whole_model: the builder path edgekit took before, by telling export that nothing streams
    code = (
        EXPORT
        if not whole_model
        else (
            "import importlib; m = importlib.import_module('edgekit.formats.onnx_int4.export'); "
            "m.why_not_streamed = lambda *a: 'benchmark: whole model'; " + EXPORT
        )
    )
    return run(name, [sys.executable, "-c", code, ckpt, str(out), "{}"], cap_gb)


EXPORT_ONLY = (
    "import sys; from edgekit import api; "
    "r = api.export(sys.argv[1], 'onnx-int4', sys.argv[2], force=True, verify=False); "
    "print('path_taken', r[0].path_taken)"
)


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    found = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in found:
                    found[key] = int(line.split()[1])
    except OSError:
        pass
    return found


def run_split(name: str, argv: list[str], env: dict[str, str], cap_gb: float) -> dict:
    """run(), with the tree's RssAnon and RssFile sampled apart (their peaks need not coincide)."""
    import psutil

    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"onnx_memory-{name}.log"
    peaks = {"rss": 0, "RssAnon": 0, "RssFile": 0}
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
        root = psutil.Process(proc.pid)
        killed = False
        while proc.poll() is None:
            try:
                pids = [root.pid, *(c.pid for c in root.children(recursive=True))]
            except psutil.Error:
                pids = []
            now = {"rss": 0, "RssAnon": 0, "RssFile": 0}
            for pid in pids:
                kb = _status_kb(pid, ("VmRSS", "RssAnon", "RssFile"))
                now["rss"] += kb["VmRSS"] * 1024
                now["RssAnon"] += kb["RssAnon"] * 1024
                now["RssFile"] += kb["RssFile"] * 1024
            peaks = {k: max(v, now[k]) for k, v in peaks.items()}
            if peaks["rss"] > cap_gb * 2**30 and not killed:
                for child in root.children(recursive=True):
                    child.kill()
                proc.kill()
                killed = True
            time.sleep(0.1)
    return {
        "step": name,
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_mib": round(peaks["rss"] / 2**20),
        "peak_anon_mib": round(peaks["RssAnon"] / 2**20),
        "peak_file_mib": round(peaks["RssFile"] / 2**20),
        "returncode": proc.returncode,
        "killed_at_cap": killed,
        "log": str(log),
    }


def scale_model(name: str, layers: int = 0):
    """A model of benchmarks/_scale_models.py, with `layers` decoder layers when not 0 (the
    same shapes otherwise: a Llama-3.2-1B-shaped checkpoint of 4 layers keeps its 128k-row
    tied lm_head, which the streamed template quantizes whatever the depth)."""
    import dataclasses

    from _scale_models import get_model

    model = get_model(name)
    if layers:
        config = {**model.config, "num_hidden_layers": layers}
        model = dataclasses.replace(model, name=f"{name}-{layers}l", config=config)
    return model


def compare_trees(
    model: str, codes: list[str], work: Path, cap_gb: float, warm_imatrix: bool = False, layers: int = 0
) -> tuple[list[dict], str]:
    if model == "smollm2-135m":
        from edgekit.embedded import ensure_checkpoint

        ckpt = ensure_checkpoint(model)
    else:
        from _scale_models import write_checkpoint

        ckpt = work / "checkpoint"
        if not (ckpt / "config.json").is_file():
            write_checkpoint(scale_model(model, layers), ckpt)
    warm = None
    if warm_imatrix:  # computed here once, copied into each fresh cache: the writing phase alone
        from edgekit.checkpoint import CheckpointFiles
        from edgekit.imatrix import load_or_compute
        from edgekit.paths import cache_dir

        load_or_compute(CheckpointFiles(ckpt, json.loads((ckpt / "config.json").read_text())))
        warm = cache_dir() / "imatrix"
    rows, digests = [], {}
    for code in codes:
        label, _, tree = code.partition("=")
        out, cache = work / f"code-{label}", work / f"cache-{label}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        if warm is not None:
            shutil.copytree(warm, cache / "imatrix")
        env = {"PYTHONPATH": str(Path(tree).resolve()), "EDGEKIT_CACHE": str(cache)}
        rows.append(run_split(label, [sys.executable, "-c", EXPORT_ONLY, str(ckpt), str(out)], env, cap_gb))
        if rows[-1]["returncode"] == 0:
            digests[label] = [sha256_file(out / f) for f in MODEL_FILES]
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    same = len(set(map(tuple, digests.values()))) == 1 and len(digests) == len(codes)
    imatrix = (
        "importance matrix cached (computed before the runs)" if warm else "importance matrix computed in each run"
    )
    return rows, f"{imatrix}; model files byte-identical across the trees: {same}"


def machine() -> str:
    import psutil

    load = os.getloadavg()
    return (
        f"{platform.node()}: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"{psutil.virtual_memory().available / 2**30:.1f} GiB available, load {load[0]:.1f} at start"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="smollm2-135m, or a model of benchmarks/_scale_models.py (llama-3.2-1b, ...)")
    ap.add_argument("--cap-gb", type=float, default=16.0, help="kill a step whose process tree passes this")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-onnx-memory"))
    ap.add_argument("--code", action="append", default=[], metavar="LABEL=DIR", help="compare source trees")
    ap.add_argument("--warm-imatrix", action="store_true", help="with --code: every run finds the imatrix cached")
    ap.add_argument("--layers", type=int, default=0, help="a scale model with this many layers (its shapes otherwise)")
    args = ap.parse_args()
    work = args.work / (args.model + (f"-{args.layers}l" if args.layers else ""))
    work.mkdir(parents=True, exist_ok=True)
    where = machine()
    rows = []
    if args.code:
        rows, extra = compare_trees(args.model, args.code, work, args.cap_gb, args.warm_imatrix, args.layers)
        return _publish(work.name, where, rows, extra, split=True)
    if args.model == "smollm2-135m":
        rows.append(edgekit_export("edgekit streamed", "smollm2-135m", work / "streamed", args.cap_gb))
        rows.append(
            edgekit_export("edgekit whole model", "smollm2-135m", work / "whole", args.cap_gb, whole_model=True)
        )
        same = all(sha256_file(work / "streamed" / f) == sha256_file(work / "whole" / f) for f in MODEL_FILES)
        extra = f"model files byte-identical between the two paths: {same}"
    else:
        from _scale_models import write_checkpoint  # benchmarks/_scale_models.py (scale branch)

        ckpt = work / "checkpoint"
        if not (ckpt / "config.json").is_file():
            write_checkpoint(scale_model(args.model, args.layers), ckpt)
        raw_out = work / "raw"
        shutil.rmtree(raw_out, ignore_errors=True)
        rows.append(
            run(
                "raw builder",
                [
                    sys.executable,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(ckpt),
                    "-o",
                    str(raw_out),
                    "-p",
                    "int4",
                    "-e",
                    "cpu",
                    "-c",
                    str(work / "raw-cache"),
                    "--extra_options",
                    "algo_config=k_quant_mixed",
                ],
                args.cap_gb,
            )
        )
        shutil.rmtree(raw_out, ignore_errors=True)
        rows.append(edgekit_export("edgekit default recipe", str(ckpt), work / "edgekit", args.cap_gb))
        extra = ""
    return _publish(work.name, where, rows, extra)


def _publish(model: str, where: str, rows: list[dict], extra: str, split: bool = False) -> int:
    load = os.getloadavg()[0]
    lines = [
        f"## onnx-int4 export, {model} ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Machine: {where}; load {load:.1f} at the end.",
        "",
    ]
    if split:
        lines += [
            "| source tree | wall s | export tree peak MiB | peak RssAnon MiB | peak RssFile MiB | exit |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['step']} | {r['wall_s']} | {r['peak_mib']} | {r['peak_anon_mib']} | {r['peak_file_mib']} "
            f"| {r['returncode']} |"
            for r in rows
        ]
    else:
        lines += ["| step | wall s | process-tree peak GiB | exit | killed at cap |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['step']} | {r['wall_s']} | {r['peak_gib']} | {r['returncode']} | {r['killed_at_cap']} |"
            for r in rows
        ]
    if extra:
        lines += ["", extra]
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps(rows, indent=2))
    results = HERE / "results" / "onnx_memory.md"
    results.parent.mkdir(exist_ok=True)
    with open(results, "a", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
