"""Real sizes: edgekit vs the raw tools on random-weight checkpoints with real models' shapes.

For each model in _scale_models.MODELS (Llama-3.2-1B, Phi-3-mini, Phi-4-mini, Phi-3-medium 14B)
this writes the checkpoint tensor by tensor, then runs each step in its own process:

  checkpoint       write the bf16 safetensors shards (tool "scale")
  raw-gguf         convert_hf_to_gguf.py --outtype f16, then llama_model_quantize Q4_K_M
  export-gguf      edgekit export CKPT --target gguf-q4_k_m --no-verify
  verify-gguf      edgekit verify BUNDLE
  bench-gguf       edgekit bench BUNDLE --profile laptop-cpu --json
  raw-onnx         python -m onnxruntime_genai.models.builder -p int4 -e cpu (builder default)
  raw-onnx-kquant  the same with --extra_options algo_config=k_quant_mixed (edgekit's algorithm)
  export-onnx      edgekit export CKPT --target onnx-int4 --no-verify (a preflight refusal is
                   recorded, then the export runs with --force)
  verify-onnx, bench-onnx

Per step: wall s, CPU s (user + sys of the process tree), peak process-tree RSS (psutil, every
0.2 s) and peak disk (growth of the model's work directory, which holds the checkpoint, the
outputs, TMPDIR and a private EDGEKIT_CACHE, plus the checkpoint). A watchdog kills the tree
when its RSS passes --rss-limit-gib (19 by default: other jobs share the machine) and records
"stopped at > 19 GiB". Before each step the free disk is checked against an estimate and the
step is skipped, with the reason recorded, if it will not fit.

Results merge into benchmarks/results/scale.json keyed (model, step, tool), so a rerun of some
models or steps updates those rows only; --render writes docs/scale.md from the json.

Usage (hours for everything; see docs/scale.md for how long each model takes):
    .venv/bin/python benchmarks/scale.py --models smoke-llama            # seconds: proves the script
    nohup .venv/bin/python benchmarks/scale.py --models llama-3.2-1b,phi3-mini > /tmp/scale.log 2>&1 &
    .venv/bin/python benchmarks/scale.py --models phi3-mini --steps export-onnx,verify-onnx,bench-onnx
    .venv/bin/python benchmarks/scale.py --render
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, host_facts, host_line  # noqa: E402
from _scale_models import MODELS, checkpoint_bytes, get_model, parameter_count, shard, tensor_layout  # noqa: E402

os.environ.setdefault("EDGEKIT_CACHE", str(ROOT / ".cache" / "edgekit"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

NAME = "scale"
RESULTS_JSON = RESULTS / "scale.json"
DOC = ROOT / "docs" / "scale.md"
GiB = 2**30
SAMPLE_S = 0.2  # RSS sampling (and watchdog) interval
DISK_SAMPLE_S = 2.0  # du of the work directory: a handful of large files, cheap
DISK_MARGIN = 2 * GiB  # left free after a step's estimated need
RERUN = ".venv/bin/python benchmarks/scale.py"
DEFAULT_MODELS = ("llama-3.2-1b", "phi3-mini", "phi4-mini", "phi3-medium")
# The shared cache entries a step may read (the llama.cpp converter, the embedded models,
# host facts); everything a step computes (imatrix, reference logits, digests) goes to a
# private cache, so every run pays the first-run cost and it is deleted with the model.
SHARED_CACHE = ("llama.cpp", "models", "downloads", "host.json")

QUANTIZE_SNIPPET = (
    "import ctypes, sys, llama_cpp\n"
    "llama_cpp.llama_backend_init()\n"
    "p = llama_cpp.llama_model_quantize_default_params()\n"
    "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M\n"
    "p.nthread = 0\n"
    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n"
)


@dataclass(frozen=True)
class Step:
    id: str  # --steps name
    step: str  # results key: what is done
    tool: str  # results key: who does it
    disk_per_param: float  # bytes the step's outputs need per parameter (free-space check)


STEPS: dict[str, Step] = {
    s.id: s
    for s in [
        Step("checkpoint", "checkpoint", "scale", 2.0),  # bf16
        Step("raw-gguf", "export-gguf", "raw", 2.6),  # f16 intermediate + Q4_K_M
        Step("export-gguf", "export-gguf", "edgekit", 2.6),  # the same, inside edgekit
        Step("verify-gguf", "verify-gguf", "edgekit", 0.1),  # parity.json, cached reference logits
        Step("bench-gguf", "bench-gguf", "edgekit", 0.0),
        Step("raw-onnx", "export-onnx", "raw", 0.8),  # int4 model.onnx.data (+ embeddings)
        Step("raw-onnx-kquant", "export-onnx", "raw-k_quant_mixed", 0.8),
        Step("export-onnx", "export-onnx", "edgekit", 0.8),
        Step("verify-onnx", "verify-onnx", "edgekit", 0.1),
        Step("bench-onnx", "bench-onnx", "edgekit", 0.0),
        # Variants, run only when --steps names them: other recipes' cost at this size, shown
        # beside the default recipe's row (tool "edgekit <variant>"; VARIANTS has the flags).
        Step("export-onnx-gptq", "export-onnx", "edgekit gptq", 0.8),
        Step("export-onnx-phone", "export-onnx", "edgekit phone", 0.8),
        Step("bench-onnx-phone", "bench-onnx", "edgekit phone", 0.0),
        Step("export-onnx-stream", "export-onnx", "edgekit stream", 0.8),
    ]
}
# Variant -> (output directory, --set flags). "phone" is the smallest phone bundle edgekit
# makes that an ORT-format file can hold at 3.8B (2 GiB cap): int4 everywhere (lm_head too), in
# blocks of 128 with integer zero points (4.28 bits a weight instead of the default's 6), an int4
# token embedding. (Not GPTQ: at 3.8B its per-tensor time was ~4x the imatrix search's.)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "gptq": ("onnx-gptq", ["weight_search=gptq"]),
    # the default recipe with the calibration pass forced block by block (VARIANT_ENV): what a
    # 16 GB runner gets, where less than 40 % of the memory is free for the model (layerwise.py)
    "stream": ("onnx-stream", []),
    "phone": (
        "onnx-phone",
        [
            "mobile=true",
            "algorithm=k_quant",
            "block_size=128",
            "zero_points=integer",
            "embeddings=int4",
        ],
    ),
}
VARIANT_ENV: dict[str, dict[str, str]] = {"stream": {"EDGEKIT_REFERENCE": "stream"}}
DEFAULT_STEPS = [s for s in STEPS if not s.endswith(tuple(f"-{v}" for v in VARIANTS))]


# --- measuring one command -------------------------------------------------------------------


def du_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def kill_tree(root) -> None:
    import psutil

    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = [root]
    for p in reversed(procs):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def run_watched(cmd: list[str], env: dict, log: Path, disk_root: Path, rss_limit: int) -> dict:
    """Run cmd with its output to `log`, sampling the tree's RSS and CPU (and killing it past
    rss_limit) and the growth of disk_root."""
    import psutil

    from edgekit.measure import tree_rss_bytes

    disk0 = du_bytes(disk_root)
    free0 = shutil.disk_usage(disk_root).free
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    state = {"rss": 0, "cpu": 0.0, "disk": 0, "free_drop": 0, "killed": False}
    stop = threading.Event()
    t0 = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=disk_root)

        def sample() -> None:
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                return
            next_disk = 0.0
            while not stop.is_set():
                rss = tree_rss_bytes(root)
                state["rss"] = max(state["rss"], rss)
                cpu = 0.0
                try:
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            t = p.cpu_times()
                            cpu += t.user + t.system + t.children_user + t.children_system
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
                state["cpu"] = max(state["cpu"], cpu)
                if rss > rss_limit and not state["killed"]:
                    state["killed"] = True
                    kill_tree(root)
                if time.perf_counter() >= next_disk:
                    state["disk"] = max(state["disk"], du_bytes(disk_root) - disk0)
                    state["free_drop"] = max(state["free_drop"], free0 - shutil.disk_usage(disk_root).free)
                    next_disk = time.perf_counter() + DISK_SAMPLE_S
                stop.wait(SAMPLE_S)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Reaped descendants are in RUSAGE_CHILDREN; a tree killed by the watchdog leaves orphans
    # that are not, so the sampled tree total is the floor then.
    cpu = max((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), state["cpu"])
    state["disk"] = max(state["disk"], du_bytes(disk_root) - disk0)
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_gib": round(state["rss"] / GiB, 2),
        "disk_growth_gib": round(max(state["disk"], 0) / GiB, 2),
        "free_drop_gib": round(max(state["free_drop"], 0) / GiB, 2),
        "returncode": rc,
        "watchdog": state["killed"],
        "last_line": lines[-1][:300] if lines else "",
        "log": str(log),
    }


# --- one model -------------------------------------------------------------------------------


class ModelRun:
    def __init__(self, name: str, work: Path, logs: Path, rss_limit_gib: float, seed: int):
        self.model = get_model(name)
        self.dir = work / name
        self.ckpt = self.dir / "checkpoint"
        self.logs = logs
        self.rss_limit = int(rss_limit_gib * GiB)
        self.rss_limit_gib = rss_limit_gib
        self.seed = seed
        self.params = parameter_count(self.model)
        self.edgekit = str(Path(sys.executable).parent / "edgekit")
        self.cache = self.dir / "cache"
        self.tmp = self.dir / "tmp"

    def env(self, private_cache: bool = True) -> dict:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(self.tmp)}
        if private_cache:
            env["EDGEKIT_CACHE"] = str(self.cache)
        return env

    def prepare(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        shared = Path(os.environ["EDGEKIT_CACHE"])
        for entry in SHARED_CACHE:
            src, dst = shared / entry, self.cache / entry
            if src.exists() and not dst.exists():
                if src.is_dir():
                    dst.symlink_to(src, target_is_directory=True)
                else:
                    shutil.copyfile(src, dst)

    def command(self, step: str) -> tuple[list[str], dict] | None:
        py, ck, d = sys.executable, str(self.ckpt), self.dir
        builder = [py, "-m", "onnxruntime_genai.models.builder", "-i", ck, "-p", "int4", "-e", "cpu"]
        table = {
            "checkpoint": [py, str(Path(__file__).with_name("_scale_models.py")), self.model.name, ck, str(self.seed)],
            "export-gguf": [
                self.edgekit,
                "export",
                ck,
                "--target",
                "gguf-q4_k_m",
                "--no-verify",
                "--out",
                str(d / "gguf"),
                "--force",
            ],
            "export-onnx": [
                self.edgekit,
                "export",
                ck,
                "--target",
                "onnx-int4",
                "--no-verify",
                "--out",
                str(d / "onnx"),
            ],
            "verify-gguf": [self.edgekit, "verify", str(d / "gguf"), "--json"],
            "verify-onnx": [self.edgekit, "verify", str(d / "onnx"), "--json"],
            "bench-gguf": [self.edgekit, "bench", str(d / "gguf"), "--profile", "laptop-cpu", "--json"],
            "bench-onnx": [self.edgekit, "bench", str(d / "onnx"), "--profile", "laptop-cpu", "--json"],
            "raw-onnx": [*builder, "-o", str(d / "raw-onnx"), "-c", str(self.tmp / "builder-cache")],
            "raw-onnx-kquant": [
                *builder,
                "-o",
                str(d / "raw-onnx-kquant"),
                "-c",
                str(self.tmp / "builder-cache"),
                "--extra_options",
                "algo_config=k_quant_mixed",
            ],
        }
        for variant, (out, flags) in VARIANTS.items():
            sets = [x for f in flags for x in ("--set", f)]
            # --force: the default recipe's row records what the preflight says at this size
            table[f"export-onnx-{variant}"] = [*table["export-onnx"][:-1], str(d / out), "--force", *sets]
        # the phone bundle on the phone profile: its budgets, context and threads
        table["bench-onnx-phone"] = [self.edgekit, "bench", str(d / "onnx-phone"), "--profile", "mobile-onnx", "--json"]
        env = self.env(private_cache=step != "checkpoint")
        env.update(VARIANT_ENV.get(step.rsplit("-", 1)[-1], {}) if step.startswith("export-onnx-") else {})
        return table.get(step), env

    def free_check(self, step: Step) -> str | None:
        need = int(step.disk_per_param * self.params) + DISK_MARGIN
        free = shutil.disk_usage(self.dir).free
        if free < need:
            return f"skipped: needs ~{need / GiB:.1f} GiB of disk, {free / GiB:.1f} GiB free"
        return None

    def run(self, step_id: str) -> dict:
        step = STEPS[step_id]
        row = {
            "model": self.model.name,
            "step": step.step,
            "tool": step.tool,
            "step_id": step_id,
            "params": self.params,
            "checkpoint_gib": round(checkpoint_bytes(self.model) / GiB, 2),
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "load_before": os.getloadavg()[0],
            "commit": source_commit(),  # which code measured it (benchmarks/preflight_fit.py keeps current rows)
        }
        if step_id != "checkpoint" and not (self.ckpt / "config.json").is_file():
            return {**row, "status": "skipped: no checkpoint (run the checkpoint step)"}
        if reason := self.free_check(step):
            return {**row, "status": reason}
        print(f"[{NAME}] {self.model.name} {step_id} ...", file=sys.stderr, flush=True)
        if step_id == "raw-gguf":
            result = self.run_raw_gguf()
        else:
            cmd, env = self.command(step_id)
            if step_id == "export-onnx":
                result = self.run_with_refusal(cmd, env)
            else:
                result = self.measure(step_id, cmd, env)
        row.update(result)
        row["load_after"] = os.getloadavg()[0]
        row["status"] = self.status(step_id, row)
        if step_id.startswith(("verify", "bench")):
            row["output"] = self.json_output(row["log"])
        if step_id in ("export-gguf", "export-onnx"):
            # The model's private cache is shared by its steps: the second export reads the
            # importance matrix the first computed, so its time and peak leave that pass out.
            log = Path(row["log"]).read_text(errors="replace")
            computed = "imatrix: calibration text" in log
            row["imatrix"] = "computed" if computed else "cached"
            if computed:  # held the whole model (memory free) or read it block by block (layerwise.py)
                row["imatrix_mode"] = "memory" if "imatrix: loading reference model" in log else "stream"
        print(
            f"[{NAME}] {self.model.name} {step_id}: {row['status']}, {row.get('wall_s')} s, "
            f"{row.get('peak_rss_gib')} GiB",
            file=sys.stderr,
            flush=True,
        )
        return row

    def measure(self, step_id: str, cmd: list[str], env: dict) -> dict:
        log = self.logs / f"{self.model.name}-{step_id}.log"
        return run_watched(cmd, env, log, self.dir, self.rss_limit)

    def status(self, step_id: str, row: dict) -> str:
        if row.get("watchdog"):
            return f"stopped at > {self.rss_limit_gib:g} GiB"
        rc = row.get("returncode")
        if rc == 0:
            return "ok"
        if rc == 3 and step_id.startswith(("verify", "bench")):
            return "ok (gate failed: exit 3)"  # random weights: parity figures are meaningless
        if rc == -9:
            return "killed (SIGKILL, out of memory?)"
        return f"failed (exit {rc})"

    def run_with_refusal(self, cmd: list[str], env: dict) -> dict:
        """edgekit export as a user types it; if the preflight refuses, record its line and
        exit code, then run it again with --force (the measured run)."""
        first = self.measure("export-onnx-preflight", cmd, env)
        if first["returncode"] == 0 or first["watchdog"] or first["wall_s"] > 120:
            return first
        refused = {
            "refusal": {"returncode": first["returncode"], "line": first["last_line"], "wall_s": first["wall_s"]}
        }
        shutil.rmtree(self.dir / "onnx", ignore_errors=True)
        return {**refused, **self.measure("export-onnx", [*cmd, "--force"], env)}

    def run_raw_gguf(self) -> dict:
        from edgekit.llamacpp_tools import converter_dir

        tools = converter_dir()
        f16, q4 = self.dir / "raw-gguf" / "model-f16.gguf", self.dir / "raw-gguf" / "model-Q4_K_M.gguf"
        f16.parent.mkdir(parents=True, exist_ok=True)
        env = {**self.env(), "PYTHONPATH": f"{tools / 'gguf-py'}"}
        convert = self.measure(
            "raw-gguf-convert",
            [
                sys.executable,
                str(tools / "convert_hf_to_gguf.py"),
                str(self.ckpt),
                "--outtype",
                "f16",
                "--outfile",
                str(f16),
                "--model-name",
                self.model.real.split("/")[-1],
            ],
            env,
        )
        parts = {"convert": convert}
        if convert["returncode"] == 0 and not convert["watchdog"]:
            parts["quantize"] = self.measure(
                "raw-gguf-quantize", [sys.executable, "-c", QUANTIZE_SNIPPET, str(f16), str(q4)], env
            )
        runs = list(parts.values())
        last = runs[-1]
        return {
            "wall_s": round(sum(r["wall_s"] for r in runs), 1),
            "cpu_s": round(sum(r["cpu_s"] for r in runs), 1),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
            # the f16 file stays on disk while quantizing: the two growths add up
            "disk_growth_gib": round(sum(r["disk_growth_gib"] for r in runs), 2),
            "free_drop_gib": max(r["free_drop_gib"] for r in runs),
            "returncode": last["returncode"],
            "watchdog": any(r["watchdog"] for r in runs),
            "last_line": last["last_line"],
            "log": last["log"],
            "parts": {
                k: {f: r[f] for f in ("wall_s", "cpu_s", "peak_rss_gib", "disk_growth_gib", "returncode")}
                for k, r in parts.items()
            },
        }

    @staticmethod
    def json_output(log: str) -> dict | list | None:
        """The --json document a verify / bench step printed (the log also holds its stderr):
        the first line that opens an object or a list and parses from there."""
        path = Path(log)
        if not path.is_file():
            return None
        text = path.read_text(errors="replace")
        for start in [i + 1 for i, ch in enumerate(text) if ch == "\n" and text[i + 1 : i + 2] in ("{", "[")]:
            try:
                return json.JSONDecoder().raw_decode(text[start:])[0]
            except ValueError:
                continue
        return None

    def cleanup_after(self, step_id: str, keep: bool) -> None:
        """Free what later steps do not read: the raw tools' outputs (sizes already measured)."""
        if keep:
            return
        if step_id in ("raw-gguf", "raw-onnx", "raw-onnx-kquant"):
            shutil.rmtree(self.dir / step_id, ignore_errors=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True, exist_ok=True)


# --- results ---------------------------------------------------------------------------------


def load_results() -> dict:
    if RESULTS_JSON.is_file():
        return json.loads(RESULTS_JSON.read_text())
    return {"rows": []}


def merge_row(doc: dict, row: dict) -> dict:
    key = (row["model"], row["step"], row["tool"])
    doc["rows"] = [r for r in doc["rows"] if (r["model"], r["step"], r["tool"]) != key] + [row]
    return doc


def save_results(doc: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS_JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS_JSON)


def source_commit() -> str | None:
    """HEAD of the tree that runs (None outside git); "+dirty" when it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!benchmarks/results",
            ],
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def tool_versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("onnxruntime-genai", "onnxruntime", "llama_cpp_python", "transformers", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_models(args) -> None:
    work = Path(args.work).resolve()
    logs = Path(args.logs).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",") if args.steps else DEFAULT_STEPS
    for s in steps:
        if s not in STEPS:
            raise SystemExit(f"unknown step {s!r}; choose from: {', '.join(STEPS)}")
    models = args.models.split(",")
    for m in models:
        get_model(m)
    doc = load_results()
    doc["host"] = host_facts()
    doc["tools"] = tool_versions()
    for name in models:
        t0 = time.perf_counter()
        run = ModelRun(name, work, logs, args.rss_limit_gib, args.seed)
        run.dir.mkdir(parents=True, exist_ok=True)
        run.prepare()
        # Without --keep the checkpoint went with the model's last run: write it again rather
        # than overwrite good rows with "no checkpoint" skips.
        todo = steps if "checkpoint" in steps or (run.ckpt / "config.json").is_file() else ["checkpoint", *steps]
        for step_id in todo:
            row = run.run(step_id)
            doc = merge_row(load_results() | {"host": doc["host"], "tools": doc["tools"]}, row)
            save_results(doc)
            run.cleanup_after(step_id, args.keep)
        doc.setdefault("model_wall_s", {})[name] = round(time.perf_counter() - t0, 1)
        save_results(doc)
        if not args.keep:
            shutil.rmtree(run.dir, ignore_errors=True)
    if args.render:
        render(load_results())


# --- rendering -------------------------------------------------------------------------------

STEP_ORDER = ("checkpoint", "export-gguf", "verify-gguf", "bench-gguf", "export-onnx", "verify-onnx", "bench-onnx")
# Which raw row an edgekit row is compared with: the same format and, for onnx, the same
# algorithm (k_quant_mixed is edgekit's default).
RAW_OF = {"export-gguf": "raw", "export-onnx": "raw-k_quant_mixed"}


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    if "wall_s" not in row:
        return row["status"]
    disk = row.get("disk_growth_gib", 0) + (row["checkpoint_gib"] if row["step"] != "checkpoint" else 0)
    text = f"{row['wall_s']:.0f} s, CPU {row['cpu_s']:.0f} s, {row['peak_rss_gib']:.1f} GiB, disk {disk:.1f} GiB"
    # when and beside how much else: wall times of rows measured at different loads do not compare
    text += f" ({row.get('date', '')[5:10]}, load {row.get('load_before', 0):.0f})"
    if row["status"] != "ok":
        text += f" — **{row['status']}**"
    return text


def _ratio(ek: dict | None, raw: dict | None) -> str:
    if not ek or not raw or ek.get("status") != "ok" or raw.get("status") != "ok":
        return "—"
    return (
        f"{ek['wall_s'] / raw['wall_s']:.2f}x wall, {ek['cpu_s'] / max(raw['cpu_s'], 0.1):.2f}x CPU, "
        f"{ek['peak_rss_gib'] / max(raw['peak_rss_gib'], 0.01):.2f}x RSS"
    )


def _bench_line(row: dict) -> str | None:
    """Decode / prefill speed, TTFT, the bench process's peak and its KV-cache share."""
    out = row.get("output")
    if out is None and row.get("log"):
        out = ModelRun.json_output(row["log"])
    recs = out if isinstance(out, list) else (out or {}).get("results", [])
    parts = []
    for r in recs:
        if isinstance(r, dict) and r.get("decode_tok_s") is not None:
            parts.append(
                f"decode {r['decode_tok_s']:.1f} tok/s, prefill {r.get('prefill_tok_s', 0):.1f} tok/s, "
                f"TTFT {r.get('ttft_ms', 0) / 1000:.2f} s, peak {r.get('peak_rss_mb', 0) / 1024:.1f} GiB "
                f"(KV cache {r.get('kv_cache_mb', 0) / 1024:.1f} GiB at context {r.get('context')}), "
                f"{r.get('threads')} threads"
            )
    return "; ".join(parts) or None


def render(doc: dict) -> str:
    # The smoke rows only prove the script; they are kept in the json, not shown.
    rows = [r for r in doc.get("rows", []) if not r["model"].startswith("smoke")]
    by = {(r["model"], r["step"], r["tool"]): r for r in rows}
    models = [m for m in MODELS if not m.startswith("smoke") and any(r["model"] == m for r in rows)]
    lines = [
        "# Scale: edgekit and the raw tools at real model sizes",
        "",
        "Random weights: parity figures meaningless; time, memory, speed real. Each checkpoint has the",
        "exact config shapes of the real model (bf16 safetensors, ~5 GB shards, written tensor by tensor",
        "by `benchmarks/_scale_models.py`); every step runs in its own process. Cells: wall time, CPU time",
        "(user + sys of the process tree), peak process-tree RSS (sampled every 0.2 s), and peak disk",
        "(the step's outputs, temporary files and cache entries, plus the checkpoint). A watchdog stops a",
        'step whose tree passes 19 GiB (other jobs share the machine): "stopped at > 19 GiB".',
        "",
    ]
    host = doc.get("host")
    if host:
        lines += [
            f"Machine: {host_line(host)}. Tools: "
            + ", ".join(f"{k} {v}" for k, v in (doc.get("tools") or {}).items())
            + ".",
            "",
        ]
    loads = [r[k] for r in rows for k in ("load_before", "load_after") if k in r]
    dates = sorted(r["date"][:10] for r in rows if "date" in r)
    if loads:
        lines += [
            f"Measured {dates[0]}"
            + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
            + f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} on 2 cores during the runs "
            "(other helpers' jobs shared the machine, so wall times are noisier than CPU times).",
            "",
        ]
    lines += ["| model | shapes of | params | bf16 checkpoint |", "|---|---|---|---|"]
    for m in DEFAULT_MODELS:
        spec = MODELS[m]
        lines.append(
            f"| {m} | {spec.real} | {parameter_count(spec) / 1e9:.2f}B | "
            f"{checkpoint_bytes(spec) / GiB:.1f} GiB in {len(shard(tensor_layout(spec)))} shard(s) |"
        )
    lines += [
        "",
        'The checkpoint row\'s "edgekit" cell is the writer (`_scale_models.py`), which the raw tools do not have.',
        "",
        "| model | params | step | edgekit | raw tool(s) | edgekit / raw |",
        "|---|---|---|---|---|---|",
    ]
    for m in models:
        params = next(r["params"] for r in rows if r["model"] == m)
        for step in STEP_ORDER:
            ek = by.get((m, step, "edgekit")) or by.get((m, step, "scale"))
            raws = [(t, r) for (mm, s, t), r in by.items() if mm == m and s == step and t.startswith("raw")]
            if ek is None and not raws:
                continue
            raw_text = "<br>".join(f"{t}: {_cell(r)}" for t, r in sorted(raws)) or "—"
            lines.append(
                f"| {m} | {params / 1e9:.2f}B | {step} | {_cell(ek)} | {raw_text} | "
                f"{_ratio(ek, by.get((m, step, RAW_OF.get(step, ''))))} |"
            )
            # other recipes at this size (VARIANTS), against the default recipe's row
            for (mm, s, t), r in sorted(by.items()):
                if mm == m and s == step and t.startswith("edgekit "):
                    variant = t.split(" ", 1)[1]
                    flags = " ".join(
                        [f"`{f}`" for f in VARIANTS.get(variant, ("", []))[1]]
                        + [f"`{k}={v}`" for k, v in VARIANT_ENV.get(variant, {}).items()]
                    )
                    lines.append(
                        f"| {m} | {params / 1e9:.2f}B | {step}, {variant}: {flags} | {_cell(r)} | — | "
                        f"vs the default recipe: {_ratio(r, ek)} |"
                    )
    notes = []
    for r in rows:
        if r.get("refusal"):
            notes.append(
                f"- {r['model']} {r['step']}: without `--force` edgekit's preflight refused "
                f'(exit {r["refusal"]["returncode"]}): "{r["refusal"]["line"]}"'
            )
        if r.get("parts"):
            notes.append(
                f"- {r['model']} raw gguf: "
                + "; ".join(f"{k} {p['wall_s']:.0f} s / {p['peak_rss_gib']:.1f} GiB" for k, p in r["parts"].items())
            )
        if r.get("status", "ok") not in ("ok", "ok (gate failed: exit 3)") and r.get("last_line"):
            notes.append(
                f"- {r['model']} {r['step']} ({r['tool']}): {r['status']}; last line: `{r['last_line'][:200]}`"
            )
        if r["step"].startswith("bench") and (b := _bench_line(r)):
            who = "" if r["tool"] == "edgekit" else f" ({r['tool']})"
            notes.append(f"- {r['model']} {r['step']}{who}: {b}")
    if notes:
        lines += ["", "Notes:", ""] + notes
    walls = {m: w for m, w in (doc.get("model_wall_s") or {}).items() if not m.startswith("smoke")}
    if walls:
        lines += [
            "",
            "Whole run per model (all steps asked for, including the checkpoint): "
            + ", ".join(f"{m} {s / 60:.0f} min" for m, s in walls.items())
            + ".",
        ]
    lines += [
        "",
        "Reproduce:",
        "",
        "```",
        f"nohup {RERUN} --models {','.join(DEFAULT_MODELS)} > /tmp/scale.log 2>&1 &   # hours; one step at a time",
        f"{RERUN} --models phi3-mini --steps checkpoint,export-onnx,verify-gguf,verify-onnx   # some rows",
        f"{RERUN} --render                                   # docs/scale.md from benchmarks/results/scale.json",
        "```",
        "",
    ]
    text = "\n".join(lines)
    extra = (
        DOC.read_text().split("<!-- scale:notes -->", 1)[1]
        if DOC.is_file() and "<!-- scale:notes -->" in DOC.read_text()
        else None
    )
    if extra is not None:
        text += "\n<!-- scale:notes -->" + extra
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help=f"comma-separated, from: {', '.join(MODELS)}")
    ap.add_argument(
        "--steps", default=None, help=f"comma-separated, from: {', '.join(STEPS)} (default: all but the variants)"
    )
    ap.add_argument("--keep", action="store_true", help="keep each model's checkpoint and outputs")
    ap.add_argument("--render", action="store_true", help="write docs/scale.md from the results json")
    ap.add_argument("--work", default=str(ROOT / "dist" / "scale"), help="where checkpoints and outputs go")
    ap.add_argument("--logs", default="/tmp/scale-logs", help="one log per step")
    ap.add_argument("--rss-limit-gib", type=float, default=19.0, help="watchdog: kill a step's tree past this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.models:
        run_models(args)
    elif args.render:
        print(render(load_results()))
    else:
        ap.error("give --models (to run) and/or --render")


if __name__ == "__main__":
    main()
