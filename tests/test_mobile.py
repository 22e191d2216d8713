"""Phone bundles (onnx-int4 recipe key `mobile`): model.ort in place of model.onnx, checked in
plain onnxruntime and onnxruntime-genai, with ONNX Runtime's mobile usability verdict."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import BadInput, IntegrityError
from edgekit.formats.onnx_int4 import mobile
from edgekit.targets import load_targets

ROOT = Path(__file__).resolve().parent.parent
EDGEKIT = str(Path(sys.executable).parent / "edgekit")  # the console script users run


def recipe(**overrides):
    from edgekit.formats import onnx_int4

    return onnx_int4.parse_recipe({**load_targets().format("onnx-int4").recipe, **overrides}, "test [recipe]")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def phone(tiny_phi3, tmp_path_factory) -> Path:
    from edgekit import api

    out = tmp_path_factory.mktemp("mobile") / "phone"
    api.export(str(tiny_phi3), "onnx-int4", out, verify=False, recipe={"mobile": True})
    return out


@pytest.fixture(scope="module")
def manifest(phone) -> dict:
    return json.loads((phone / "manifest.json").read_text())


# --- recipe ------------------------------------------------------------------------------------


def test_mobile_is_off_by_default_and_typed():
    assert recipe().mobile is False and recipe(mobile=True).mobile is True
    for bad in ("yes", 1, "true "):
        with pytest.raises(BadInput, match="'mobile' must be bool") as e:
            recipe(mobile=bad)
        assert "\n" not in str(e.value)


def test_cli_refuses_a_bad_mobile_value_in_one_line(tiny_phi3, tmp_path):
    out = tmp_path / "x"
    r = subprocess.run(
        [EDGEKIT, "export", str(tiny_phi3), "--target", "onnx-int4", "--set", "mobile=yes"]
        + ["--out", str(out), "--no-verify"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'mobile' must be bool" in lines[0]


def test_build_config_takes_mobile_in_a_recipe(tmp_path):
    from edgekit.buildconfig import load_config

    cfg = load_config(ROOT / "edgekit.toml")
    phone = next(j for j in cfg.jobs() if j.id == "smollm2-135m-mobile-onnx-int4")
    assert phone.model.recipe == {"onnx-int4": {"mobile": True}} and phone.profiles == ("mobile-onnx",)


def test_mobile_profile_budgets():
    p = load_targets().profile("mobile-onnx")
    assert (p.max_peak_rss_mb, p.max_bundle_mb, p.min_decode_tok_s) == (2048, 1900, 6.2)
    assert (p.context, p.threads) == (2048, 4)
    # the bundle budget leaves room under the ORT format's cap for tokenizer and configs
    assert p.max_bundle_mb * 2**20 < mobile.ORT_FORMAT_LIMIT


# --- the bundle --------------------------------------------------------------------------------


@pytest.mark.slow
def test_phone_bundle_files(phone, manifest):
    names = {e["path"] for e in manifest["files"]}
    assert {"model.ort", "required_operators.config", "genai_config.json", "tokenizer.json"} <= names
    assert not ({"model.onnx", "model.onnx.data"} & names)
    assert names == {p.name for p in phone.iterdir() if p.name != "manifest.json"}
    genai = json.loads((phone / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "model.ort"
    config = (phone / "required_operators.config").read_text()
    assert "com.microsoft;1;" in config and "MatMulNBits" in config and str(phone.parent) not in config
    q = manifest["quantization"]
    assert q["mobile"] is True and q["model_file"] == "model.ort"
    ort = q["ort_format"]
    assert ort["converted"] and ort["genai_generates"] and ort["ort_bytes"] == (phone / "model.ort").stat().st_size
    assert 0 <= ort["max_abs_logit_diff"] <= mobile.MAX_LOGIT_DIFF
    assert ort["kv_element_bytes"] == 4
    # the weights once, as in the .onnx files: no optimizer may store a second copy of any. The
    # ORT format's own structure costs ~23 KB more than the .onnx files on tiny Phi-3 whatever the
    # weights (4.4 % with a float embedding, 5.5 % with the int8 one); a second copy of lm_head's
    # codes (512 x 64 int8 plus scales, 36 KiB) would cross the line.
    assert ort["ort_bytes"] - ort["onnx_bytes"] < 32 * 1024


@pytest.mark.slow
def test_usability_verdict_in_the_manifest(manifest):
    verdict = manifest["quantization"]["mobile_usability"]
    # The builder's decoder leans on ONNX Runtime's own ops, which neither NNAPI nor CoreML has.
    assert {"MatMulNBits", "GroupQueryAttention"} <= set(verdict["contrib_ops"])
    assert set(verdict["eps"]) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
    for ep in verdict["eps"].values():
        assert "com.microsoft:MatMulNBits" in ep["unsupported_ops"]
        assert ep["supported_nodes"] < ep["nodes"] and ep["suitability"] == "NO"
    assert verdict["recommended"] == ["CPU"]
    assert any("partitions" in line for line in verdict["log"])
    assert any(n.startswith("mobile usability") for n in manifest["export"]["notes"])


@pytest.fixture(scope="module")
def desktop(tiny_phi3, tmp_path_factory) -> Path:
    """A plain onnx-int4 export (model.onnx + model.onnx.data), no manifest: what mobile starts from."""
    from test_onnx import RecordingProgress

    from edgekit.checkpoint import resolve
    from edgekit.formats import onnx_int4

    staging = tmp_path_factory.mktemp("mobile") / "desktop"
    staging.mkdir()
    onnx_int4.export(resolve(str(tiny_phi3)), staging, recipe(), RecordingProgress())
    return staging


@pytest.mark.slow
def test_ort_logits_equal_the_onnx(desktop, tmp_path):
    """The check export runs, on a fresh pair: the .onnx kept beside its .ort."""
    import shutil

    staging = tmp_path / "b"
    shutil.copytree(desktop, staging)
    mobile.convert_to_ort(staging / "model.onnx", staging / "model.ort")
    diff = mobile.max_logit_diff(staging / "model.onnx", staging / "model.ort", 8)
    assert diff <= mobile.MAX_LOGIT_DIFF
    # and the check has teeth: the same graph with its float embedding scaled by 1.1 is far off
    import onnx
    from onnx import numpy_helper

    from edgekit.formats.onnx_int4.files import save_onnx

    model = onnx.load(str(staging / "model.onnx"))
    embedding = next(t for t in model.graph.initializer if "embed" in t.name and t.data_type == onnx.TensorProto.FLOAT)
    embedding.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(embedding) * 1.1, embedding.name))
    other = tmp_path / "other"
    other.mkdir()
    save_onnx(model, other / "model.onnx")
    (other / "genai_config.json").write_text((staging / "genai_config.json").read_text())
    assert mobile.max_logit_diff(other / "model.onnx", staging / "model.ort", 8) > mobile.MAX_LOGIT_DIFF


@pytest.mark.slow
def test_a_failed_check_keeps_the_onnx(desktop, tmp_path, monkeypatch):
    import shutil

    from test_onnx import RecordingProgress

    staging = tmp_path / "b"
    shutil.copytree(desktop, staging)
    monkeypatch.setattr(mobile, "MAX_LOGIT_DIFF", -1.0)  # any difference, even 0, now fails
    result = mobile.make_mobile(staging, RecordingProgress())
    assert result.quantization["model_file"] == "model.onnx" and not result.quantization["ort_format"]["converted"]
    assert any(n.startswith("model.ort was not kept: its logits differ") for n in result.notes)
    assert {"model.onnx", "model.onnx.data"} <= {p.name for p in staging.iterdir()}
    assert not (staging / "model.ort").exists() and not (staging / "required_operators.config").exists()
    assert json.loads((staging / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"


@pytest.mark.slow
def test_genai_generates_from_the_ort_bundle(phone, tiny_phi3):
    """Plain onnxruntime-genai, no edgekit: the bundle as a phone app would open it."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_phi3)).encode("The capital of France is", add_special_tokens=False)
    model = og.Model(str(phone))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 8, min_length=len(ids) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    assert len(out) == 8 and all(0 <= t < 512 for t in out)


@pytest.mark.slow
def test_edgekit_session_runs_the_ort_bundle(phone):
    from edgekit import api

    answer = api.run(str(phone), "Hello", max_tokens=4, raw=True)
    assert answer.prompt_tokens > 0


@pytest.mark.slow
def test_validate_passes_and_a_tampered_model_ort_fails(phone, tmp_path):
    import shutil

    from edgekit.runbundle import validate

    assert validate(phone)["quantization"]["mobile"] is True
    copy = tmp_path / "tampered"
    shutil.copytree(phone, copy)
    data = bytearray((copy / "model.ort").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.ort").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.ort"):
        validate(copy)


@pytest.mark.slow
def test_rebuild_reproduces_the_declared_files(phone, manifest, tiny_phi3, tmp_path):
    from edgekit import api

    again = tmp_path / "again"
    api.export(str(tiny_phi3), "onnx-int4", again, verify=False, recipe={"mobile": True})
    declared = manifest["reproducible_files"]
    assert "required_operators.config" in declared and "genai_config.json" in declared
    for name in declared:
        assert sha(again / name) == sha(phone / name), name
    # ONNX Runtime writes model.ort's bytes differently on each conversion, so it is not
    # declared; the rebuilt one computes the same logits.
    assert "model.ort" not in declared
    assert mobile.max_logit_diff(phone / "model.ort", again / "model.ort", 8) == 0.0


def test_over_the_ort_cap_keeps_the_onnx(tmp_path, monkeypatch):
    """Past 2 GiB no conversion is tried: the graph is still checked, the .onnx stays, a note says so."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 1024)
    monkeypatch.setattr(mobile, "ORT_FORMAT_LIMIT", 1000)

    from test_onnx import RecordingProgress

    result = mobile.make_mobile(tmp_path, RecordingProgress())
    assert result.quantization["ort_format"]["converted"] is False
    assert result.quantization["model_file"] == "model.onnx"
    assert any("over the ORT format's 2 GiB cap" in n for n in result.notes)
    assert (tmp_path / "model.onnx").exists() and not (tmp_path / "model.ort").exists()
    assert result.quantization["mobile_usability"]["eps"]["NNAPI"]["partitions"] == 1


@pytest.mark.slow
def test_bench_measures_the_phone_bundle_against_the_mobile_budgets(phone, manifest):
    from edgekit import api

    [r] = api.bench([phone], profile="mobile-onnx", prompt_tokens=8, gen_tokens=2, reps=1, write_manifest=False)
    ort_bytes = next(e["size"] for e in manifest["files"] if e["path"] == "model.ort")
    assert r.model_bytes == ort_bytes  # the weights bench counts per decoded token are model.ort's
    assert r.kv_bytes_per_token > 0 and r.context == 2048
    # the tiny bundle is far inside every mobile-onnx budget (peak RSS, size, decode speed)
    assert r.passed and r.budget_failures == ()


@pytest.mark.slow
def test_a_phone_bundle_of_an_untied_model_quantizes_its_embedding(phone, manifest):
    """tiny Phi-3 does not tie its embedding: with mobile = true and nothing else, the float
    Gather becomes edgekit's int8 GatherBlockQuantized, and the bundle is still in ORT format."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    q = manifest["quantization"]
    assert q["weights"]["embedding"] == "int8"
    assert q["edgekit_requantization"]["embedding"] == {
        "tensor": "model.embed_tokens.weight",
        "rows": 512,
        "hidden": 64,
        "bits": 8,
        "block_size": 32,
    }
    assert q["model_file"] == "model.ort" and q["ort_format"]["converted"] and q["ort_format"]["genai_generates"]
    graph = InferenceSession.InferenceSession.GetRootAs((phone / "model.ort").read_bytes(), 0).Model().Graph()
    ops = [graph.Nodes(i).OpType().decode() for i in range(graph.NodesLength())]
    assert ops.count("GatherBlockQuantized") == 1  # (the Gathers left read shapes, not a table)
    names = {graph.Initializers(i).Name().decode() for i in range(graph.InitializersLength())}
    assert "model.embed_tokens.weight" not in names and "model.embed_tokens.weight_Q8G32" in names
    assert "GatherBlockQuantized" in (phone / "required_operators.config").read_text()
    assert any("token embedding quantized by edgekit: int8" in n for n in manifest["export"]["notes"])


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_embedding_stays_close_to_the_desktop_bundle(bits, desktop, phone, tiny_phi3, tmp_path):
    """The phone bundle's logits (int8 embedding, model.ort) against the desktop bundle's (float
    embedding, model.onnx), and an int4 phone bundle's, which converts to ORT format too now that
    edgekit writes uint8 codes. Measured on tiny Phi-3 (random weights at initializer_range 0.2,
    so large logits) over the 8-token check prefill: int8 0.24, int4 1.71 max |difference|; the
    bounds leave 2x room, and the difference is never 0 (the embedding did change)."""
    from edgekit import api

    if bits == 8:
        bundle = phone
    else:
        bundle = tmp_path / "int4"
        api.export(str(tiny_phi3), "onnx-int4", bundle, verify=False, recipe={"mobile": True, "embeddings": "int4"})
        m = json.loads((bundle / "manifest.json").read_text())
        assert m["quantization"]["weights"]["embedding"] == "int4" and m["quantization"]["model_file"] == "model.ort"
    diff = mobile.max_logit_diff(desktop / "model.onnx", bundle / "model.ort", 8)
    assert 0 < diff < (EMBEDDING_LOGIT_BOUND[bits])


EMBEDDING_LOGIT_BOUND = {8: 0.5, 4: 3.5}
