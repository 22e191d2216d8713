"""`edgekit run --reference`: the bundle's answer next to the unquantized checkpoint's, and where
and by how much they part. On the fake format (tests/fakeformat.py) with the tiny random Phi-3:
the console script, a real transformers reference, no runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakeformat import NAME, fake_format  # noqa: F401 - the fixture, used by pytestmark

from edgekit.runbundle import Divergence, ReferenceRun, RunResult

pytestmark = pytest.mark.usefixtures("fake_format")

EDGEKIT = str(Path(sys.executable).parent / "edgekit")


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEKIT, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture
def fake_bundle(tiny_phi3, tmp_path) -> Path:
    out = tmp_path / "b"
    r = cli("export", tiny_phi3, "--target", NAME, "--no-verify", "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    return out


def _reference_greedy(checkpoint: Path, messages: list[dict[str, str]], n: int) -> tuple[list[int], list[int], list]:
    """Prompt ids, greedy ids and the logits each answer token was chosen from, computed here
    independently: transformers' own chat template, teacher-forced full forward passes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, attn_implementation="eager")
    ids = [int(t) for t in tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out: list[int] = []
    rows = []
    with torch.inference_mode():
        for _ in range(n):
            row = model(torch.tensor([ids + out])).logits[0, -1].float().numpy()
            rows.append(row)
            if int(row.argmax()) in eos:
                break
            out.append(int(row.argmax()))
    return ids, out, rows


def test_run_reference_json_gives_both_answers_same_prompt_ids_and_the_divergence(fake_bundle, tiny_phi3):
    r = cli("run", fake_bundle, "--prompt", "Hello", "--max-tokens", "6", "--reference", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    ref = doc["reference"]
    ids, greedy, rows = _reference_greedy(tiny_phi3, [{"role": "user", "content": "Hello"}], 6)
    assert ref["format"] == "reference" and ref["prompt_ids"] == ids == doc["prompt_ids"]
    assert doc["prompt_ids_match"] is True
    assert ref["token_ids"] == greedy  # the checkpoint's own greedy answer, not the bundle's
    # The fake's logits are uniform (scale 0): it always picks token 0, which the random model does not.
    bundle = doc["token_ids"]
    step = next(i for i in range(len(bundle)) if i >= len(greedy) or bundle[i] != greedy[i])
    div = doc["divergence"]
    assert div["step"] == step
    row = rows[step]
    assert div["margin"] == pytest.approx(float(row.max() - row[bundle[step]]), abs=1e-3)
    assert div["margin"] > 0


def test_run_reference_prints_both_answers_and_says_where_they_part(fake_bundle):
    r = cli("run", fake_bundle, "--prompt", "Hello", "--max-tokens", "4", "--reference")
    assert r.returncode == 0, r.stderr
    assert "[fake-int4:" in r.stderr and "[reference: the unquantized checkpoint" in r.stderr
    assert "[reference (float32, transformers):" in r.stderr
    assert "the bundle leaves the reference at" in r.stderr or "the bundle's answer is the reference's" in r.stderr
    assert r.stdout.count("\n") == 2  # the bundle's answer, then the reference's (random tokens: no splitlines)


def test_run_reference_without_the_checkpoint_is_one_line_exit_2(tiny_phi3, tmp_path):
    ckpt = tmp_path / "gone"
    shutil.copytree(tiny_phi3, ckpt)
    out = tmp_path / "b"
    assert cli("export", ckpt, "--target", NAME, "--no-verify", "--out", out, "-q").returncode == 0
    shutil.rmtree(ckpt)
    r = cli("run", out, "--prompt", "Hello", "--max-tokens", "2", "--reference")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --reference: no unquantized checkpoint to run") and str(ckpt) in last
    assert "Traceback" not in r.stderr


class _Tok:
    def decode(self, ids):
        return "|".join(f"t{i}" for i in ids)


def _ref(token_ids: tuple[int, ...], rows: list[list[float]], stopped_by: str) -> ReferenceRun:
    result = RunResult("b", "reference", "p", "", 3, len(token_ids), stopped_by, 0.0, 0.0, token_ids, (1, 2, 3))
    return ReferenceRun(result, [np.asarray(r, dtype=np.float32) for r in rows], _Tok(), "float32", frozenset({0}))


def test_divergence_names_the_first_different_choice_and_the_references_margin():
    # vocab: 0 = EOS, 1..3 words. The reference answers 1, 2 then ends (EOS row).
    rows = [[0.0, 5.0, 4.9, 1.0], [0.0, 1.0, 3.0, 2.0], [9.0, 1.0, 2.0, 3.0]]
    ref = _ref((1, 2), rows, "eos")
    assert ref.divergence((1, 2), "eos") is None  # the same answer, both ended
    assert ref.divergence((1,), "max_tokens") is None  # the bundle ran out of tokens first
    assert ref.divergence((2, 2), "eos") == Divergence(0, "t1", "t2", pytest.approx(0.1, abs=1e-4))
    assert ref.divergence((1, 3), "eos") == Divergence(1, "t2", "t3", 1.0)
    # The bundle ended its answer where the reference went on, and the other way round.
    assert ref.divergence((1,), "eos") == Divergence(1, "t2", "t0", 3.0)
    assert ref.divergence((1, 2, 3), "max_tokens") == Divergence(2, "t0", "t3", 6.0)
    near = ref.divergence((2,), "max_tokens")
    assert near is not None and "near-tie" in near.describe() and "first answer token" in near.describe()
    assert "near-tie" not in Divergence(1, "a", "b", 3.0).describe()
