"""edgekit bench on the tiny Phi-3 bundles: the timed trial is exactly one generation of the
requested length, the CLI's JSON and the manifest section, budgets (exit 3), bad input (exit 2)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit import bench as benchmod
from edgekit import bench_child, bench_plan
from edgekit.bundle import read_manifest, validate
from edgekit.cli import cli
from edgekit.formats import Trial, backend
from edgekit.targets import load_targets

FAST = ["--prompt-tokens", "16", "--gen-tokens", "4", "--reps", "2"]
RECORD_KEYS = {f.name for f in dataclasses.fields(benchmod.BenchRecord)}
ON_APPLE = sys.platform == "darwin"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- one timed trial = one generation of gen_tokens tokens -------------------------------------


@pytest.mark.slow
def test_llama_trial_is_one_generation_of_the_requested_length(tiny_gguf):
    from edgekit.formats.gguf_q4km.recipe import MODEL_FILE
    from edgekit.formats.gguf_q4km.session import LlamaCppSession

    session = LlamaCppSession.open_offloaded(tiny_gguf / MODEL_FILE, threads=1, context=256, gpu_layers=0)
    try:
        prompt = bench_child.prompt_ids(session.encode, 12)
        greedy = session.generate(prompt, 5, ignore_eos=True).token_ids
        fed: list[list[int]] = []
        real_eval = session._llm.eval
        session._llm.eval = lambda tokens: (fed.append(list(tokens)), real_eval(tokens))[1]
        trials = bench_child.run_trials(session.timed_generate, prompt, gen_tokens=5, reps=2, warmup=1)
    finally:
        session.close()
    assert [t.n_generated for t in trials] == [5, 5]
    # per trial (warm-up included): the prompt once, then one forward pass for each new token
    # but the last, and those tokens are the greedy continuation
    one = [prompt] + [[t] for t in greedy[:-1]]
    assert fed == one * 3
    assert all(t.prefill_s > 0 and t.first_token_s >= t.prefill_s and t.decode_s > 0 for t in trials)


class _CountingGenerator:
    def __init__(self, real, log):
        self._real, self._log = real, log
        log.append({"append": [], "next": 0})

    def append_tokens(self, tokens):
        self._log[-1]["append"].append(len(tokens))
        self._real.append_tokens(tokens)

    def generate_next_token(self):
        self._log[-1]["next"] += 1
        self._real.generate_next_token()

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.slow
def test_onnx_trial_is_one_generation_of_the_requested_length(tiny_onnx):
    from types import SimpleNamespace

    import onnxruntime_genai as og

    from edgekit.formats.onnx_int4 import open_session

    session = open_session(tiny_onnx, read_manifest(tiny_onnx), threads=1)
    log: list[dict] = []
    options: list[dict] = []

    class Params(og.GeneratorParams):
        def set_search_options(self, **kw):
            options.append(kw)
            super().set_search_options(**kw)

    session._og = SimpleNamespace(
        GeneratorParams=Params, Generator=lambda model, params: _CountingGenerator(og.Generator(model, params), log)
    )
    prompt = bench_child.prompt_ids(session.encode, 12)
    trials = bench_child.run_trials(
        lambda p, n, probe=None: session.timed_generate(p, n, probe, max_length=64),
        prompt,
        gen_tokens=5,
        reps=2,
        warmup=1,
    )
    assert [t.n_generated for t in trials] == [5, 5]
    assert log == [{"append": [12], "next": 5}] * 3  # warm-up + 2 reps, one generator each
    assert all(o["min_length"] == o["max_length"] == 64 and o["do_sample"] is False for o in options)


def test_run_trials_warms_up_then_probes_only_the_last_rep():
    calls, probes = [], []

    def fake(prompt, n, probe=None):
        calls.append(probe is not None)
        if probe:
            probe("prefill")
            probe("decode")
        return Trial(prefill_s=0.1, first_token_s=0.11, decode_s=0.3, n_generated=n)

    trials = bench_child.run_trials(fake, [1, 2, 3], gen_tokens=4, reps=3, warmup=2, probe=probes.append)
    assert len(trials) == 3 and calls == [False, False, False, False, True]
    assert probes == ["prefill", "decode"]


# --- the command --------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_json_on_both_formats_writes_manifest_and_jsonl(tiny_gguf, tiny_onnx, tmp_path):
    out = tmp_path / "bench.jsonl"
    result = invoke("bench", tiny_gguf, tiny_onnx, "--profile", "laptop-cpu", *FAST, "--json", "--output", out)
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["format"] for r in records] == ["gguf-q4_k_m", "onnx-int4"]
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["profile"] == "laptop-cpu" and r["profile_source"] == "requested" and r["passed"]
        assert (r["prompt_tokens"], r["gen_tokens"], r["reps"], len(r["trials"])) == (16, 4, 2, 2)
        assert all(t["n_generated"] == 4 for t in r["trials"])
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"] and r["decode_tok_s"] > 0
        assert r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0 and r["load_s"] > 0
        assert 0 < r["rss_before_load_mb"] <= r["rss_after_load_mb"] <= r["peak_rss_mb"]
        assert r["model_bytes"] > 0 and r["kv_bytes_per_token"] > 0 and r["bytes_per_token"] > r["model_bytes"]
        # (a tiny model on a loaded machine can round to 0.000: check the figure, not its size)
        assert r["read_bandwidth_gbs"] > 0
        assert r["bandwidth_utilization"] == round(
            r["decode_tok_s"] * r["bytes_per_token"] / (r["read_bandwidth_gbs"] * 1e9), 3
        )
        # the KV cache is allocated for the whole context: its share of the peak is reported
        assert r["kv_cache_mb"] == round(r["kv_bytes_per_token"] * r["context"] / 2**20, 1) > 0
        assert r["kv_share_of_peak"] == round(r["kv_cache_mb"] / r["peak_rss_mb"], 3)
        assert {"cpu", "physical_cores", "logical_cores", "ram_gb", "os"} <= set(r["host"])
        assert r["runtime"] and all(r["runtime"].values())
        assert json.loads(json.dumps(benchmod.BenchRecord.from_dict(r).to_dict())) == r  # one JSON round trip
        # the manifest keeps the latest record per profile and host; the bundle still validates
        bundle = Path(r["bundle"])
        assert read_manifest(bundle)["bench"]["laptop-cpu"][r["host_id"]] == r
        validate(bundle)
    lines = out.read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == records


@pytest.mark.slow
def test_kv_bytes_come_from_the_source_config(tiny_gguf, tiny_onnx):
    # tiny Phi-3: 2 layers, 2 KV heads, head_dim 64/4 = 16; llama.cpp f16 cache, the builder's fp32
    assert bench_plan.kv_bytes_per_token(read_manifest(tiny_gguf), 2) == 2 * 2 * 2 * 16 * 2
    # the element size is the format's: read from the ONNX graph's past_key input, f16 for llama.cpp
    profile = load_targets().profile("laptop-cpu")
    for bundle, elem in ((tiny_onnx, 4), (tiny_gguf, 2)):
        manifest = read_manifest(bundle)
        assert backend(manifest["format"]).bench_setup(bundle, manifest, profile).kv_element_bytes == elem


@pytest.mark.slow
def test_no_arguments_benches_dist_on_the_detected_profile(tiny_gguf, tiny_onnx, tmp_path, monkeypatch):
    for b in (tiny_gguf, tiny_onnx):
        shutil.copytree(b, tmp_path / "dist" / b.name)
    monkeypatch.chdir(tmp_path)
    result = invoke("bench", *FAST)
    assert result.exit_code == 0, result.output
    expected = "m-series" if ON_APPLE and bench_plan.detect_profile(_host())[0] == "m-series" else "laptop-cpu"
    assert f"profile: {expected}" in result.stderr
    assert "decode tok/s" in result.stderr  # the table
    assert result.stdout == ""
    for b in (tiny_gguf, tiny_onnx):
        bench = read_manifest(tmp_path / "dist" / b.name)["bench"]
        [record] = bench[expected].values()
        assert record["profile_source"] == "detected"


def _host():
    from edgekit.host import facts

    return facts()


@pytest.mark.slow
@pytest.mark.skipif(ON_APPLE, reason="Metal is available on Apple silicon")
def test_metal_profile_on_linux_records_what_it_substituted(tiny_gguf):
    result = invoke("bench", tiny_gguf, "--profile", "m-series", *FAST, "--json", "--no-manifest")
    assert result.exit_code == 0, result.output
    [r] = json.loads(result.stdout)
    assert r["gpu_layers"] == 0
    assert any(s.startswith("gpu_layers:") and "CPU" in s for s in r["substitutions"])
    assert any(s.startswith("threads:") for s in r["substitutions"])  # no performance-core count here


@pytest.mark.slow
def test_mobile_budget_exceeded_exits_3_after_reporting(tiny_onnx):
    result = invoke(
        "bench", tiny_onnx, "--profile", "mobile-onnx", *FAST, "--set", "max_peak_rss_mb=1", "--json", "--no-manifest"
    )
    assert result.exit_code == 3, result.output
    [r] = json.loads(result.stdout)
    assert not r["passed"] and "max_peak_rss_mb" in r["budget_failures"][0]
    assert r["context"] == 2048
    # progress stays on stderr under --json; the error is its last line
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: bench budget exceeded"), result.stderr
    assert not any(ln.startswith("error:") for ln in lines[:-1]), result.stderr


@pytest.mark.slow
def test_child_peak_rss_is_its_own_not_the_parents(tiny_onnx):
    """A vfork+exec child inherits the parent's ru_maxrss; the record must not."""
    import numpy as np

    from edgekit import api

    ballast = np.ones(400 * 2**20 // 8)  # 400 MB resident in this (parent) process
    [r] = api.bench([tiny_onnx], profile="laptop-cpu", prompt_tokens=16, gen_tokens=4, reps=1, write_manifest=False)
    assert ballast.sum() > 0
    assert r.peak_rss_mb < 300


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expect",
    [
        (["{empty}"], "is not an edgekit bundle"),
        (["{missing}"], "no such bundle"),
        (["{onnx}", "--profile", "tablet"], "unknown profile 'tablet'"),
        (["{gguf}", "--profile", "mobile-onnx"], "profile mobile-onnx does not take gguf-q4_k_m"),
        (["{onnx}", "--reps", "0"], "--reps must be at least 1"),
        (
            ["{onnx}", "--profile", "mobile-onnx", "--prompt-tokens", "2000", "--gen-tokens", "100"],
            "exceed the context of 2048",
        ),
        (["{gguf}", "--gen-tokens", "1"], "--gen-tokens must be at least 2"),
        (["{onnx}", "--set", "max_rss=1"], "unknown key 'max_rss'"),
        (["{onnx}", "--output", "{tmp}/no/such/dir/x.jsonl"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_runs_nothing(tiny_gguf, tiny_onnx, tmp_path, args, expect):
    (tmp_path / "empty").mkdir()
    subs = {
        "{empty}": tmp_path / "empty",
        "{missing}": tmp_path / "missing",
        "{onnx}": tiny_onnx,
        "{gguf}": tiny_gguf,
        "{tmp}": tmp_path,
    }
    args = [str(subs.get(a, a)).replace("{tmp}", str(tmp_path)) for a in args]
    before = {b: (b / "manifest.json").read_bytes() for b in (tiny_gguf, tiny_onnx)}
    result = invoke("bench", *args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expect in lines[0]
    assert result.stdout == ""
    assert {b: (b / "manifest.json").read_bytes() for b in before} == before


@pytest.mark.slow
def test_the_parent_never_imports_a_runtime(tiny_gguf, tiny_onnx):
    import subprocess

    code = (
        "import sys\n"
        "from edgekit import api\n"
        f"api.bench([{str(tiny_gguf)!r}, {str(tiny_onnx)!r}], profile='laptop-cpu', prompt_tokens=8, gen_tokens=2,"
        " reps=1, write_manifest=False)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'llama_cpp', 'onnxruntime', 'onnxruntime_genai', 'torch'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_profile_accuracy_level_the_bundle_lacks_is_recorded(tiny_onnx):
    from edgekit import api

    [r] = api.bench(
        [tiny_onnx],
        profile="mobile-onnx",
        prompt_tokens=8,
        gen_tokens=2,
        reps=1,
        write_manifest=False,
        overrides={"accuracy_level": 1},
    )
    assert r.accuracy_level == 4  # what the graph carries
    assert any(s.startswith("accuracy_level: the profile asks for 1") for s in r.substitutions)
