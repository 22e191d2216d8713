"""edgekit eval on real bundles: the reference row is transformers' own greedy generate(), a
bundle damaged on purpose loses accuracy and shows flips, a chat-template drift costs chat
items only, results land in the manifest and --output, and [eval] gates fail a build entry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit import api
from edgekit.bundle import read_manifest, validate, write_manifest
from edgekit.tasks import shipped_path

pytestmark = pytest.mark.slow  # eval runs the bundles in their runtimes

EDGEKIT = [str(Path(sys.executable).parent / "edgekit")]
TINY_TASKS = [
    {
        "id": "raw",
        "prompt": "The capital of France is",
        "expected": "Paris",
        "match": "contains",
        "max_tokens": 6,
        "group": "g",
    },
    {
        "id": "chat",
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "expected": "Paris",
        "match": "contains",
        "max_tokens": 6,
        "group": "g",
    },
    {
        "id": "mc",
        "prompt": "The capital of France is",
        "match": "choice",
        "choices": ["Paris", "Rome", "Oslo"],
        "expected": "Paris",
        "group": "g",
    },
]


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("tasks") / "tiny.jsonl", TINY_TASKS)


@pytest.fixture(scope="module")
def smol_tasks(tmp_path_factory) -> Path:
    """The first 40 shipped items: 8 facts, each as a raw completion, two chat phrasings, a
    one-word chat answer and a raw multiple choice."""
    lines = [ln for ln in shipped_path().read_text().splitlines() if ln.startswith("{")][:40]
    return _write(tmp_path_factory.mktemp("tasks") / "smol.jsonl", lines)


def _copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def test_eval_cli_on_a_tiny_bundle_writes_manifest_output_and_one_json_document(tiny_gguf, tiny_tasks, tmp_path):
    b = _copy(tiny_gguf, tmp_path / "b")
    size = sum(f["size"] for f in read_manifest(b)["files"])  # as eval finds it: its figures then grow README.md
    out = tmp_path / "items.jsonl"
    r = subprocess.run(
        [*EDGEKIT, "eval", str(b), "--tasks", str(tiny_tasks), "--output", str(out), "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one document
    assert "only 3 items" in r.stderr  # the fewer-than-30 warning, on stderr
    [rec] = doc["bundles"]
    [ref] = doc["references"]
    assert rec["n_items"] == 3 and 0 <= rec["accuracy_low"] <= rec["accuracy"] <= rec["accuracy_high"] <= 1
    assert {m["match"] for m in rec["by_match"]} == {"contains", "choice"}
    assert rec["choice_items"] == 1 and rec["ece"] is not None
    assert rec["e2e_ms_p50"] <= rec["e2e_ms_p95"] <= rec["e2e_ms_max"] and rec["ttft_ms_p95"] <= rec["e2e_ms_max"]
    assert rec["peak_rss_mb"] > 10 and rec["size_bytes"] == size
    assert rec["accuracy_delta"] == pytest.approx(rec["accuracy"] - ref["accuracy"], abs=1e-4)
    assert ref["format"] == "transformers" and ref["size_bytes"] is None
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(lines) == 6 and {ln["kind"] for ln in lines} == {"bundle", "reference"}
    for ln in lines:
        assert ln["prompt_ids"] and isinstance(ln["correct"], bool) and ln["e2e_ms"] > 0 and "answer" in ln
    mc = next(ln for ln in lines if ln["id"] == "mc" and ln["kind"] == "bundle")
    assert sum(mc["choice_probs"]) == pytest.approx(1.0, abs=1e-4) and mc["answer"] in ("Paris", "Rome", "Oslo")
    stored = read_manifest(b)["eval"]
    assert list(stored) == [rec["tasks"]] and stored[rec["tasks"]]["accuracy"] == rec["accuracy"]
    validate(b)  # the manifest update keeps the bundle intact
    r = subprocess.run(
        [*EDGEKIT, "select", str(b), "--stored", "--tasks", str(tiny_tasks), "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["selection"]["pick"] == str(b)


def test_eval_bad_inputs_are_one_line_exit_2(tiny_gguf, tiny_tasks, tmp_path):
    cases = [
        (["eval", str(tiny_gguf), "--tasks", str(tiny_tasks), "--limit", "0"], "--limit must be at least 1"),
        (["eval", str(tiny_gguf), "--tasks", str(tiny_tasks), "--output", str(tmp_path)], "is a directory"),
        (["eval", str(tiny_gguf), "--tasks", str(tiny_tasks), "--min-accuracy", "0.5"], "need --pick"),
        (["eval", str(tmp_path / "nope"), "--tasks", str(tiny_tasks)], "no such bundle"),
        (["eval", str(tiny_gguf), "--tasks", str(tiny_tasks), "--no-reference", "--reference", "x"], "contradict"),
    ]
    for args, message in cases:
        r = subprocess.run([*EDGEKIT, *args], capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_eval_pick_exits_3_when_no_bundle_is_feasible(tiny_gguf, tiny_tasks, tmp_path):
    b = _copy(tiny_gguf, tmp_path / "b")
    r = subprocess.run(
        [
            *EDGEKIT,
            "eval",
            str(b),
            "--tasks",
            str(tiny_tasks),
            "--no-reference",
            "--pick",
            "--max-rss-mb",
            "1",
            "--no-manifest",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 3, r.stderr
    assert "nearest miss: b (peak RSS" in r.stderr.splitlines()[-1]
    assert "eval" not in read_manifest(b)  # --no-manifest


def test_select_runs_eval_when_given_bundles(tiny_gguf, tiny_onnx, tiny_tasks, tmp_path):
    a, b = _copy(tiny_gguf, tmp_path / "a"), _copy(tiny_onnx, tmp_path / "b")
    r = subprocess.run(
        [
            *EDGEKIT,
            "select",
            str(a),
            str(b),
            "--tasks",
            str(tiny_tasks),
            "--no-reference",
            "--max-rss-mb",
            "100000",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    sel = json.loads(r.stdout)["selection"]
    assert sel["pick"] in (str(a), str(b)) and sel["front"]
    verdicts = {v["name"]: v for v in sel["verdicts"]}
    assert verdicts[sel["pick"]]["picked"] and len(verdicts) == 2
    other = next(v for n, v in verdicts.items() if n != sel["pick"])
    assert other["reason"] and not other["picked"]
    # the constraint that needs a reference cannot be met without one: exit 3, nearest miss named
    r = subprocess.run(
        [*EDGEKIT, "select", str(a), "--tasks", str(tiny_tasks), "--no-reference", "--max-accuracy-drop", "0.5"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 3 and "accuracy drop unknown" in r.stderr.splitlines()[-1]


@pytest.fixture(scope="module")
def smol_eval(smol_onnx, smol_tasks, tmp_path_factory):
    """The undamaged ONNX bundle, a copy with a damaged lm_head and one with a drifted chat
    template, all in one eval (one reference row)."""
    import onnx
    from onnx import numpy_helper

    root = tmp_path_factory.mktemp("damage")
    damaged = _copy(smol_onnx, root / "damaged")
    model = onnx.load(str(damaged / "model.onnx"))
    for init in model.graph.initializer:
        if init.name == "lm_head.MatMul.weight_scale":
            s = numpy_helper.to_array(init)
            factor = np.random.default_rng(0).uniform(0.3, 1.7, size=(s.shape[0], 1)).astype(s.dtype)
            init.CopyFrom(numpy_helper.from_array((s * factor).astype(s.dtype), init.name))
            break
    else:
        pytest.fail("no lm_head scale initializer")
    (damaged / "model.onnx.data").unlink()
    onnx.save_model(
        model,
        str(damaged / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    write_manifest(damaged, read_manifest(damaged))  # re-hash: the damage must reach eval, not validate

    # A template written for another message schema ({"text": ...}): every message renders empty.
    # (Milder drifts, e.g. a missing generation prompt, cost this model almost nothing.)
    drifted = _copy(smol_onnx, root / "drifted")
    cfg = json.loads((drifted / "tokenizer_config.json").read_text())
    assert "message['content']" in cfg["chat_template"]
    cfg["chat_template"] = cfg["chat_template"].replace("message['content']", "message['text']")
    (drifted / "tokenizer_config.json").write_text(json.dumps(cfg))
    (drifted / "chat_template.jinja").write_text(cfg["chat_template"])
    write_manifest(drifted, read_manifest(drifted))
    report = api.evaluate([smol_onnx, damaged, drifted], tasks=smol_tasks, write_manifest=False)
    return report, {Path(r.name).name: r for r in report.bundles}


@pytest.mark.slow
def test_reference_answers_equal_transformers_generate(smol_eval, smollm2_dir, smol_tasks):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekit.tasks import load_tasks

    report, _ = smol_eval
    [ref] = report.references
    tasks = load_tasks(smol_tasks)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    checked = 0
    for task, item in zip(tasks.tasks, ref.items):
        if task.match == "choice" or checked >= 12:
            continue
        if task.kind == "chat":
            ids = tok.apply_chat_template(task.chat(), add_generation_prompt=True, tokenize=True)
        else:
            ids = tok(task.prompt, add_special_tokens=False).input_ids
        assert list(item.prompt_ids) == list(ids), task.id
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=task.max_tokens, do_sample=False)
        new = out[0, len(ids) :].tolist()
        assert item.answer == tok.decode(new, skip_special_tokens=True), task.id
        checked += 1
    assert checked == 12
    assert 0.3 < ref.accuracy < 1.0  # a 135M model gets part of it right


@pytest.mark.slow
def test_damaged_bundle_loses_accuracy_and_shows_flips(smol_eval):
    report, by = smol_eval
    good, bad = by["smol-onnx"], by["damaged"]
    assert good.accuracy > 0.3
    assert bad.accuracy < good.accuracy - 0.1, (bad.accuracy, good.accuracy)
    assert bad.flips_lost > bad.flips_gained and bad.flip_rate > good.flip_rate
    assert bad.accuracy_delta < good.accuracy_delta
    assert bad.mcnemar_p < 0.05  # that many one-directional flips are not chance


@pytest.mark.slow
def test_chat_template_drift_costs_chat_items_only(smol_eval):
    _, by = smol_eval
    good, drift = by["smol-onnx"], by["drifted"]
    pairs = list(zip(good.items, drift.items))
    chat = [(g, d) for g, d in pairs if g.format.startswith("chat/")]
    raw = [(g, d) for g, d in pairs if g.format.startswith("raw/")]
    assert chat and raw
    right = sum(g.correct for g, _ in chat)
    assert right >= 4 and sum(d.correct for _, d in chat) <= right // 2
    for g, d in raw:  # same weights, same tokenizer: raw prompts answer exactly as before
        assert (g.prompt_ids, g.answer, g.correct, g.choice_probs) == (
            d.prompt_ids,
            d.answer,
            d.correct,
            d.choice_probs,
        )
    for g, d in chat:
        assert g.prompt_ids != d.prompt_ids  # the drift is in what the template renders


BUILD = """\
[build]
formats = ["gguf-q4_k_m"]
profiles = ["laptop-cpu"]
reps = 1
warmup = 0
prompt_tokens = 16
gen_tokens = 8

[eval]
tasks = "tasks.jsonl"
{gates}

[[model]]
source = "{src}"
name = "tiny"
thresholds.gguf-q4_k_m = {{ kld_mean_max = 50.0, top1_agreement_min = 0.0, ppl_ratio_max = 50.0, tokenizer_agreement_min = 0.5 }}
"""


def test_build_with_eval_gates_fails_the_entry_and_reuses_by_task_hash(tiny_phi3, tmp_path):
    _write(tmp_path / "tasks.jsonl", TINY_TASKS)
    cfg, out = tmp_path / "edgekit.toml", tmp_path / "out"
    cfg.write_text(BUILD.format(src=tiny_phi3, gates="min_accuracy = 1.0\nmax_flip_rate = 1.0"))
    r = subprocess.run([*EDGEKIT, "build", "--config", cfg, "--out", out, "--json"], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr[-2000:]
    [e] = json.loads(r.stdout)["entries"]
    gates = {g["name"]: g for g in e["gates"] if g["kind"] == "eval"}
    assert set(gates) == {"eval.accuracy", "eval.flip_rate"}
    assert not gates["eval.accuracy"]["passed"] and gates["eval.flip_rate"]["passed"]
    assert e["status"] == "gate_failed" and "eval.accuracy" in e["message"]
    assert e["eval"]["n_items"] == 3 and e["eval"]["reference_accuracy"] is not None
    assert "Eval on `tasks@" in (out / "summary.md").read_text()
    assert 'id="accuracy-latency"' in (out / "report.html").read_text()

    cfg.write_text(BUILD.format(src=tiny_phi3, gates="min_accuracy = 0.0"))
    r = subprocess.run([*EDGEKIT, "build", "--config", cfg, "--out", out, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    [e2] = json.loads(r.stdout)["entries"]
    assert not e2["reused"]  # the gates are part of the inputs
    r = subprocess.run([*EDGEKIT, "build", "--config", cfg, "--out", out, "--json"], capture_output=True, text=True)
    assert json.loads(r.stdout)["entries"][0]["reused"]
    assert (
        'id="pick">' in (out / "report.html").read_text()
        and "<b>tiny-gguf-q4_k_m</b>" in (out / "report.html").read_text()
    )
    _write(tmp_path / "tasks.jsonl", TINY_TASKS[:2])  # same path, other content: rebuilt
    r = subprocess.run([*EDGEKIT, "build", "--config", cfg, "--out", out, "--json"], capture_output=True, text=True)
    [e3] = json.loads(r.stdout)["entries"]
    assert r.returncode == 0 and not e3["reused"] and e3["eval"]["n_items"] == 2

    bad = tmp_path / "bad.toml"
    bad.write_text(BUILD.format(src=tiny_phi3, gates="max_flip_rate = 2"))
    r = subprocess.run([*EDGEKIT, "build", "--config", bad, "--out", out], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.toml:11: 'max_flip_rate' must be between 0 and 1" in r.stderr
