"""`edgekit build` as release CI runs it: a real matrix (tiny Phi-3 in both formats), real
exports, parity, bench, tarballs; reuse, gates, baseline regressions, shards and merge,
validate, and the HTML report rendered in a real headless browser."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgekit.buildconfig import load_config
from edgekit.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent
EDGEKIT = [str(Path(sys.executable).parent / "edgekit")]  # the console script users run

# A random tiny model is far from any int4 recipe's accuracy and genai's tokenizer differs on
# whitespace runs (README): thresholds loose enough that the gates pass, so the tests below
# can make one fail on purpose.
CONFIG = """\
[build]
formats = ["gguf-q4_k_m", "onnx-int4"]
profiles = ["laptop-cpu"]
reps = 1
warmup = 0
prompt_tokens = 16
gen_tokens = 8

[budgets.laptop-cpu]
max_peak_rss_mb = 8192

[[model]]
source = "{src}"
name = "tiny"
thresholds.onnx-int4 = {{ kld_mean_max = 50.0, top1_agreement_min = 0.0, ppl_ratio_max = 50.0, tokenizer_agreement_min = 0.5 }}
thresholds.gguf-q4_k_m = {{ kld_mean_max = 50.0, top1_agreement_min = 0.0, ppl_ratio_max = 50.0, tokenizer_agreement_min = 0.5 }}
"""


def cli(*args, cwd=None):
    return subprocess.run([*EDGEKIT, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def config(tiny_phi3, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "edgekit.toml"
    p.write_text(CONFIG.format(src=tiny_phi3))
    return p


@pytest.fixture(scope="module")
def built(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "dist"
    r = cli("build", "--config", config, "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout), r


@pytest.mark.slow
def test_build_writes_bundles_tarballs_sums_summary_and_report(built):
    out, summary, run = built
    ids = [e["id"] for e in summary["entries"]]
    assert ids == ["tiny-gguf-q4_k_m", "tiny-onnx-int4"]
    assert json.loads((out / "summary.json").read_text()) == summary
    sums = dict(line.split("  ")[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    for e in summary["entries"]:
        assert e["status"] == "ok" and e["exit_code"] == 0 and not e["reused"]
        tar = out / e["tarball"]
        assert sums[e["tarball"]] == e["tarball_sha256"] == sha256(tar)
        manifest = json.loads((out / e["bundle"] / "manifest.json").read_text())
        assert manifest["build"]["input_key"] == e["input_key"]
        assert manifest["parity"]["kld_mean"] == e["parity"]["kld_mean"]
        assert manifest["bench"]["laptop-cpu"]  # bench results are in the packed manifest too
        kinds = {g["kind"] for g in e["gates"]}
        assert kinds == {"parity", "budget"} and all(g["passed"] for g in e["gates"])
        assert [b["profile"] for b in e["bench"]] == ["laptop-cpu"] and e["bench"][0]["decode_tok_s"] > 0
        assert e["timings"]["export_s"] > 0 and e["timings"]["bench_s"] > 0
        with tarfile.open(tar) as t:
            names = t.getnames()
        assert names[0] == e["bundle"] and f"{e['bundle']}/manifest.json" in names
    assert (out / "tiny-gguf-q4_k_m" / "Modelfile").is_file()
    md = (out / "summary.md").read_text()
    assert "| tiny-onnx-int4 | ok |" in md and "0 failed" in md and "host ?" not in md
    assert "[1/2] tiny-gguf-q4_k_m" in run.stderr and "[2/2] tiny-onnx-int4" in run.stderr  # matrix progress
    html = (out / "report.html").read_text()
    # Self-contained: two inline plots, nothing fetched (no scripts, stylesheets or images by URL).
    assert html.count("<svg") == 2 and "<script" not in html and "<link" not in html and "src=" not in html


@pytest.mark.slow
def test_validate_accepts_the_tarballs_and_names_a_damaged_file(built, tmp_path):
    out, summary, _ = built
    tars = [out / e["tarball"] for e in summary["entries"]]
    r = cli("validate", *tars, out / "tiny-onnx-int4")
    assert r.returncode == 0, r.stderr
    # Damage one byte inside a copy of the GGUF bundle's model file, re-pack, validate: exit 4.
    bundle = tmp_path / "tiny-gguf-q4_k_m"
    shutil.copytree(out / "tiny-gguf-q4_k_m", bundle)
    data = bytearray((bundle / "model.gguf").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.gguf").write_bytes(bytes(data))
    from edgekit.tarball import pack

    bad = tmp_path / "bad.tar.gz"
    pack(bundle, bad)
    r = cli("validate", bad)
    assert r.returncode == 4 and "model.gguf" in r.stderr and "sha256" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # Truncated tarball: exit 4 before anything is extracted.
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(tars[0].read_bytes()[: tars[0].stat().st_size // 2])
    r = cli("validate", cut)
    assert r.returncode == 4 and "truncated" in r.stderr


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "device"])
def test_hostile_tarball_is_rejected_before_writing_anything(tmp_path, kind):
    import io

    tar_path = tmp_path / "evil.tar.gz"
    with tarfile.open(tar_path, "w:gz") as t:
        d = tarfile.TarInfo("b")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        info = tarfile.TarInfo({"absolute": "/tmp/evil", "dotdot": "b/../../evil"}.get(kind, "b/evil"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        elif kind == "device":
            info.type = tarfile.CHRTYPE
        payload = b"x" if info.type == tarfile.REGTYPE else b""
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    from edgekit.errors import IntegrityError
    from edgekit.tarball import extract_safely

    with pytest.raises(IntegrityError):
        extract_safely(tar_path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not Path("/tmp/evil").exists()
    r = cli("validate", tar_path)
    assert r.returncode == 4 and "evil" in r.stderr


@pytest.mark.slow
def test_unchanged_inputs_are_reused_and_a_baseline_regression_fails(built, config, tmp_path):
    out, summary, _ = built
    r = cli("build", "--config", config, "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(r.stdout)
    assert all(e["reused"] for e in again["entries"]) and "reused: inputs unchanged" in r.stderr
    assert [e["tarball_sha256"] for e in again["entries"]] == [e["tarball_sha256"] for e in summary["entries"]]

    # The previous release was better than this one on KLD: the build fails naming the delta.
    base = tmp_path / "previous"
    base.mkdir()
    doc = json.loads((out / "summary.json").read_text())
    doc["entries"][1]["parity"]["kld_mean"] /= 10
    (base / "summary.json").write_text(json.dumps(doc))
    r = cli("build", "--config", config, "--out", out, "--baseline", base, "--json")
    assert r.returncode == 3, r.stderr[-2000:]
    res = json.loads(r.stdout)
    onnx = res["entries"][1]
    failed = [g for g in onnx["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == ["kld_mean"] and failed[0]["kind"] == "regression"
    assert failed[0]["delta"] == pytest.approx(
        onnx["parity"]["kld_mean"] - doc["entries"][1]["parity"]["kld_mean"], abs=1e-6
    )
    assert res["entries"][0]["status"] == "ok"  # the other entry compared equal
    assert "tiny-onnx-int4" in r.stderr.splitlines()[-1] and "kld_mean" in r.stderr.splitlines()[-1]
    # The same baseline without the doctored figure passes.
    (base / "summary.json").write_text((out / "summary.json").read_text())
    assert cli("build", "--config", config, "--out", out, "--baseline", base).returncode == 0


@pytest.mark.slow
def test_failing_entries_do_not_stop_the_matrix_and_the_worst_code_wins(built, config, tmp_path):
    out, summary, _ = built
    work = tmp_path / "dist"
    shutil.copytree(out, work)
    cfg = tmp_path / "edgekit.toml"
    text = config.read_text().replace(
        "thresholds.gguf-q4_k_m = { kld_mean_max = 50.0", "thresholds.gguf-q4_k_m = { kld_mean_max = 0.0"
    )
    cfg.write_text(text + '\n[[model]]\nsource = "./no-such-checkpoint"\nname = "missing"\nformats = ["gguf-q4_k_m"]\n')
    r = cli("build", "--config", cfg, "--out", work, "--json")
    res = {e["id"]: e for e in json.loads(r.stdout)["entries"]}
    assert res["missing-gguf-q4_k_m"]["status"] == "error" and res["missing-gguf-q4_k_m"]["exit_code"] == 2
    assert res["tiny-gguf-q4_k_m"]["status"] == "gate_failed"  # thresholds changed: rebuilt, then gated
    assert not res["tiny-gguf-q4_k_m"]["reused"]
    assert res["tiny-onnx-int4"]["status"] == "ok" and res["tiny-onnx-int4"]["reused"]
    assert r.returncode == 2  # bad input outranks a failed gate
    assert not (work / "missing-gguf-q4_k_m.tar.gz").exists()
    md = (work / "summary.md").read_text()
    assert "kld_mean" in md and "missing-gguf-q4_k_m" in md


@pytest.mark.slow
def test_shards_merged_equal_the_unsharded_build(built, config, tmp_path):
    out, summary, _ = built
    for k in (1, 2):
        r = cli("build", "--config", config, "--out", tmp_path / f"shard{k}", "--shard", f"{k}/2")
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(json.loads((tmp_path / f"shard{k}" / "summary.json").read_text())["entries"]) == 1
    r = cli("build", "--merge", tmp_path / "shard1", "--merge", tmp_path / "shard2", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr[-2000:]
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())

    def comparable(doc):
        # Apart from timings: wall times, speeds, RSS, dates, and tarballs (their manifests hold those).
        # size_bytes too: parity.json in the bundle records its own wall time, so it varies by bytes.
        drop = {"timings", "built_timings", "bench", "tarball_sha256", "reused", "size_bytes"}
        entries = [{k: v for k, v in e.items() if k not in drop} for e in doc["entries"]]
        for e in entries:
            e["gates"] = [g for g in e["gates"] if g["kind"] == "parity"]
            e["parity"] = {k: v for k, v in e["parity"].items() if k not in ("wall_s", "peak_rss_mb")}
        return entries

    got, want = comparable(merged), comparable(summary)
    assert [e["id"] for e in got] == [e["id"] for e in want]
    for a, b in zip(got, want):
        for key in sorted(set(a) | set(b)):
            assert a.get(key) == b.get(key), (a["id"], key)
    for e, f in zip(merged["entries"], summary["entries"]):
        assert e["size_bytes"] == pytest.approx(f["size_bytes"], rel=1e-3)
        assert sha256(tmp_path / "merged" / e["tarball"]) == e["tarball_sha256"]
        # Rebuilt from scratch in another directory: the reproducible files are byte-identical.
        for rel in e["reproducible_files"]:
            assert sha256(tmp_path / "merged" / e["bundle"] / rel) == sha256(out / e["bundle"] / rel), rel
        # Manifests agree apart from timestamps and timings (parity.json holds its wall time,
        # README.md the bench figures).
        assert _stable(tmp_path / "merged" / e["bundle"]) == _stable(out / e["bundle"])
    sums = (tmp_path / "merged" / "SHA256SUMS").read_text()
    assert all(e["tarball"] in sums for e in merged["entries"])
    r = cli("build", "--merge", tmp_path / "shard1", "--merge", tmp_path / "shard1", "--out", tmp_path / "m2")
    assert r.returncode == 2 and "appears in two shards" in r.stderr


def _stable(bundle: Path) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    for key in ("created_at", "bench"):
        m.pop(key)
    for k in ("wall_s", "peak_rss_mb"):
        m["export"].pop(k)
    m["files"] = [f for f in m["files"] if f["path"] not in ("parity.json", "README.md")]
    return m


@pytest.mark.slow
def test_report_renders_its_plots_in_headless_chromium(built, tmp_path):
    from PIL import Image

    out, _, _ = built
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert browser, "Chromium is installed by `make test` (Debian package chromium)"
    html = tmp_path / "report.html"
    assert cli("report", out, "--out", html).returncode == 0
    r = cli("report", out, "--out", tmp_path / "missing-dir" / "r.html")
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "missing-dir").exists()
    png = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={png}",
            "--window-size=1100,2600",
            html.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    img = Image.open(png).convert("RGB")
    assert img.size == (1100, 2600)
    colors = img.getcolors(maxcolors=1 << 20)

    def near(hex_color, alpha=1.0, tol=30):
        rgb = [int(hex_color[i : i + 2], 16) * alpha + 255 * (1 - alpha) for i in (1, 3, 5)]  # over white
        return sum(n for n, c in colors if all(abs(a - b) <= tol for a, b in zip(c, rgb)))

    from edgekit.report import POINT_ALPHA, format_color

    # The scatter points (one colour per format, the backend's PLOT_COLOR) and the RSS bars are painted.
    assert near(format_color("onnx-int4"), POINT_ALPHA) > 50
    assert near(format_color("gguf-q4_k_m"), POINT_ALPHA) > 50
    assert near("#9467bd") > 500


def test_config_errors_name_the_key_and_line(tmp_path):
    p = tmp_path / "edgekit.toml"
    p.write_text('[build]\nformats = ["onnx-int4"]\n\n[[model]]\nsource = "x"\nquantise = "q4"\n')
    with pytest.raises(BadInput, match=r"edgekit.toml:6: unknown key 'quantise'"):
        load_config(p)
    p.write_text('[build]\nreps = "three"\n[[model]]\nsource = "x"\n')
    with pytest.raises(BadInput, match=r"edgekit.toml:2: 'reps' must be int"):
        load_config(p)
    p.write_text('[[model]]\nsource = "x"\nprofiles = ["watch"]\n')
    with pytest.raises(BadInput, match=r"unknown profile 'watch'"):
        load_config(p)
    p.write_text("[build\n")
    with pytest.raises(BadInput, match="malformed TOML"):
        load_config(p)
    r = cli("build", "--config", p, "--out", tmp_path / "o")
    assert r.returncode == 2 and "malformed TOML" in r.stderr and not (tmp_path / "o").exists()


def test_the_example_config_in_the_repo_is_valid(tmp_path):
    cfg = load_config(ROOT / "edgekit.toml")
    assert [j.id for j in cfg.jobs()] == [
        "smollm2-135m-gguf-q4_k_m",
        "smollm2-135m-mobile-onnx-int4",
        "smollm2-135m-onnx-int4",
    ]
    assert cfg.jobs()[0].budgets(cfg, "laptop-cpu")["max_peak_rss_mb"] == 2048
    # Its commented second model is valid too once uncommented.
    text = (ROOT / "edgekit.toml").read_text()
    tail = text[text.index("# [[model]]") :]
    uncommented = "\n".join(line[2:].split("  #")[0] if line.startswith("# ") else line for line in tail.splitlines())
    (tmp_path / "edgekit.toml").write_text(text[: text.index("# A second model")] + uncommented)
    cfg = load_config(tmp_path / "edgekit.toml")
    phi = next(j for j in cfg.jobs() if j.id == "phi3-mini-onnx-int4")
    assert phi.profiles == ("laptop-cpu", "mobile-onnx")
    # the profile's own budgets (targets/profiles.toml) apply beneath this per-model override
    assert phi.budgets(cfg, "mobile-onnx") == {"max_peak_rss_mb": 3072.0}


def test_shard_slices_are_deterministic_and_cover_the_matrix():
    from edgekit.build import parse_shard, take_shard

    jobs = list(range(7))
    parts = [take_shard(jobs, parse_shard(f"{k}/3")) for k in (1, 2, 3)]
    assert sorted(sum(parts, [])) == jobs and [len(p) for p in parts] == [3, 2, 2]
    for bad in ("0/2", "3/2", "a/b", "2"):
        with pytest.raises(BadInput):
            parse_shard(bad)


@pytest.mark.slow
def test_summary_records_round_trip_the_json_a_real_build_wrote(built):
    """summary.json -> BuildSummary / BuildEntry / Gate -> the same JSON, key for key, so a
    stored build still reads; every gate keeps the keys build gates have always had."""
    from edgekit.gates import Gate
    from edgekit.summary import BuildEntry, BuildSummary

    _, doc, _ = built  # what the first build wrote (later tests rebuild into the same directory)
    assert BuildSummary.from_dict(doc).to_dict() == doc
    for e in doc["entries"]:
        entry = BuildEntry.from_dict(e)
        assert entry.to_dict() == e and entry.status == "ok" and not entry.failed_gates
        for g in e["gates"]:
            assert g["kind"] in ("parity", "budget")
            assert set(g) == {"kind", "name", "figure", "op", "threshold", "passed"}
            assert Gate.from_dict(g).to_dict() == g


@pytest.mark.slow
def test_an_entry_judged_by_a_failed_gate_is_gate_failed_with_exit_3(built):
    """with_gates on a real entry: one failing regression gate turns it gate_failed (exit 3)
    with the gate's one line as its message; passing gates leave it ok."""
    import dataclasses

    from edgekit.build import regression_gates
    from edgekit.buildconfig import REGRESSION_DEFAULTS
    from edgekit.errors import ExitCode
    from edgekit.summary import BuildEntry

    _, summary, _ = built
    entry = BuildEntry.from_dict(summary["entries"][0])
    same = entry.with_gates(list(entry.gates) + regression_gates(entry, entry, REGRESSION_DEFAULTS))
    assert same.status == "ok" and same.exit_code == ExitCode.OK and not same.failed_gates
    better = dataclasses.replace(entry, parity={**entry.parity, "kld_mean": entry.parity["kld_mean"] / 10})
    worse = entry.with_gates(list(entry.gates) + regression_gates(entry, better, REGRESSION_DEFAULTS))
    assert worse.status == "gate_failed" and worse.exit_code == ExitCode.GATE_FAILED
    assert worse.message.startswith("kld_mean ") and "(baseline" in worse.message and "fails <=" in worse.message
