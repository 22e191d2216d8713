"""A third format for the fast tier: the FormatBackend protocol without a runtime.

`fake-int4` bundles hold one small JSON file (model.fake) and a copy of the checkpoint's
tokenizer. Its session tokenizes with that tokenizer (the same fast tokenizer as the reference, so the
tokenizer and chat-template checks pass for real; plain encoding uses the `tokenizers` file
directly, so only a chat prompt imports transformers), and its logits are a seeded function of the
token prefix: deterministic, the same teacher-forced or one token at a time, and as far from the
reference as the recipe's `scale` says (0 = uniform logits, close to a random tiny model's; large
= confidently wrong), so a test chooses whether a parity gate passes or fails.

The `fake_format` fixture (tests/conftest.py style, used by tests/test_fast_*.py) registers it the
way a plugin would: in edgekit.formats.REGISTRY for this process, a targets directory on top of the
shipped ones ($EDGEKIT_TARGETS_DIR), and a sitecustomize on PYTHONPATH that registers it again in
every child interpreter (the console script, build's job processes, bench and eval children).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit.formats import REGISTRY, BenchRuntime, BenchSetup, ExportCost, ExportNotes, Generation, Trial
from edgekit.targets import dataclass_from_table

NAME = "fake-int4"
MODEL_FILE = "model.fake"
VERSION = "1.0"
SUPPORTED_ARCHITECTURES = frozenset({"Phi3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"})
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # not copied: a fake bundle holds no weights
_MARKER = "edgekit-tiny.json"  # edgekit.tiny's own marker file, not part of the model

TARGET_TOML = f"""\
# {NAME}: a format with no runtime, for tests (tests/fakeformat.py).
[format]
name = "{NAME}"
description = "fake int4 for tests"
runtime = "none"
model_files = ["{MODEL_FILE}"]

[recipe]
seed = 0      # seeds the logits function
scale = 0.0   # logit spread: 0 gives uniform logits (near a random tiny model's), 20 fails any KLD gate

[thresholds]
# Loose enough that the default recipe passes against a random tiny model; tests tighten them.
kld_mean_max = 2.0   # a random tiny model vs uniform logits: KLD about 1.2
top1_agreement_min = 0.0
ppl_ratio_max = 10.0
tokenizer_agreement_min = 1.0
chat_template_match = true

[[tune]]
name = "spread 20"   # fails the KLD gate
set = {{ scale = 20.0 }}

[[tune]]
name = "uniform (default)"
set = {{}}
"""

PROFILES_TOML = f"""\
# A host profile that accepts the fake format (added to the shipped profiles).
[profiles.fake-cpu]
description = "the fake format on this host's CPU"
formats = ["{NAME}"]
threads = 1
context = 512
prompt_tokens = 16
gen_tokens = 8
"""

SITECUSTOMIZE = """\
# Written by tests/fakeformat.py: register the fake format in every interpreter the tests start.
import sys
sys.path.append({tests!r})
from edgekit.formats import REGISTRY
REGISTRY.setdefault({name!r}, "fakeformat")
"""


@dataclass(frozen=True)
class FakeRecipe:
    seed: int = 0
    scale: float = 0.0


def parse_recipe(table: dict[str, Any], where: str) -> FakeRecipe:
    recipe = dataclass_from_table(FakeRecipe, table, where)
    return FakeRecipe(seed=int(recipe.seed), scale=float(recipe.scale))


def tool_versions() -> dict[str, str]:
    return {"fakeformat": VERSION}


def export(checkpoint: Any, staging: Path, recipe: FakeRecipe, progress: Any) -> ExportNotes:
    with progress.step("writing the fake model"):
        for src in sorted(Path(checkpoint.path).iterdir()):
            if src.is_file() and not src.name.endswith(_WEIGHTS) and src.name != _MARKER:
                shutil.copyfile(src, staging / src.name)
        model = {
            "seed": recipe.seed,
            "scale": recipe.scale,
            "vocab_size": int(checkpoint.config["vocab_size"]),
            "architecture": checkpoint.architecture,
        }
        (staging / MODEL_FILE).write_text(json.dumps(model, sort_keys=True) + "\n", encoding="utf-8")
    return ExportNotes(
        quantization={"bits": 4},
        tools=tool_versions(),
        path_taken="fake",
        notes=("fake format: no weights",),
        reproducible_files=(MODEL_FILE,),
    )


def open_session(bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None, **_: Any) -> FakeSession:
    path = Path(bundle_dir) / MODEL_FILE
    if not path.is_file():
        from edgekit.errors import BadInput

        raise BadInput(f"{bundle_dir} has no {MODEL_FILE}", f"Pass a {NAME} bundle directory")
    return FakeSession(Path(bundle_dir), json.loads(path.read_text(encoding="utf-8")))


def _eos_ids(bundle: Path) -> frozenset[int]:
    """End-of-generation ids as transformers' generate() stops on them: generation_config.json's
    (an id or a list), else config.json's."""
    for name in ("generation_config.json", "config.json"):
        path = bundle / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            if value is not None:
                return frozenset(value if isinstance(value, list) else [value])
    return frozenset()


class FakeSession:
    """Deterministic logits from the token prefix; the bundle's tokenizer for text."""

    def __init__(self, bundle: Path, model: dict[str, Any]):
        from tokenizers import Tokenizer

        # The fast tokenizer's own file: what transformers' tokenizer runs underneath, without
        # importing transformers (and torch) into `edgekit run`, bench and eval children.
        self.bundle = bundle
        self.tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        self.eos = _eos_ids(bundle)
        self.seed, self.scale, self.vocab = int(model["seed"]), float(model["scale"]), int(model["vocab_size"])
        self._chat: Any = None

    def _row(self, prefix: Sequence[int]) -> np.ndarray:
        digest = hashlib.blake2b(
            np.asarray(prefix, dtype=np.int64).tobytes(), digest_size=8, key=self.seed.to_bytes(8, "little")
        ).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return (rng.standard_normal(self.vocab) * self.scale).astype(np.float32)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def chat_prompt_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if self._chat is None:  # the bundle's chat template as transformers renders it; loaded on first use
            from transformers import AutoTokenizer

            self._chat = AutoTokenizer.from_pretrained(str(self.bundle))
        ids = self._chat.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return [int(i) for i in ids]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        return (
            np.stack([self._row(ids[: i + 1]) for i in range(len(ids))])
            if ids
            else np.zeros((0, self.vocab), np.float32)
        )

    def stepwise_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
        ids = [*prompt_ids, *continuation]
        rows = [self._row(ids[:n]) for n in range(len(prompt_ids), len(ids))]
        return np.stack(rows) if rows else np.zeros((0, self.vocab), np.float32)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> Generation:
        ids, out, stopped = list(prompt_ids), [], "max_tokens"
        for _ in range(max_tokens):
            token = int(np.argmax(self._row(ids)))
            if token in self.eos and not ignore_eos:
                stopped = "eos"
                break
            ids.append(token)
            out.append(token)
            if on_text:
                on_text(self.decode([token]))
        return Generation(tuple(out), self.decode(out), len(prompt_ids), stopped)

    def timed_generate(
        self,
        prompt_ids: Sequence[int],
        gen_tokens: int,
        probe: Callable[[str], None] | None = None,
        max_length: int | None = None,
    ) -> Trial:
        """Exactly gen_tokens greedy tokens (EOS does not stop it), timed like a runtime's."""
        ids = list(prompt_ids)
        t0 = time.perf_counter()
        row = self._row(ids)  # the prompt's last position: the fake's whole prefill
        t1 = time.perf_counter()
        if probe:
            probe("prefill")
        ids.append(int(np.argmax(row)))
        t2 = time.perf_counter()
        for _ in range(gen_tokens - 1):
            ids.append(int(np.argmax(self._row(ids))))
        t3 = time.perf_counter()
        if probe:
            probe("decode")
        return Trial(prefill_s=t1 - t0, first_token_s=t2 - t0, decode_s=t3 - t2, n_generated=gen_tokens)

    def close(self) -> None:
        self._chat = None


# --- what bench, preflight, the bundle README and the report ask of a format ---------------------

FALLBACK_ARCHITECTURES: frozenset[str] = frozenset()  # no second export path
LONG_CONTEXT_LIMITS: dict[str, str] = {}  # the fake has no context limit of its own
KNOWN_DIFFERENCES: dict[str, str] = {}  # nothing to excuse: its logits are wrong on purpose
# A JSON file and a tokenizer copy: no RAM or disk that grows with the model.
PREFLIGHT_COST = ExportCost(
    ram_fixed_mb=50, ram_per_largest=0.0, ram_per_layer=0.0, disk_fixed_mb=1, disk_per_fp32_byte=0.0
)
PLOT_COLOR = "#2ca02c"  # green: not one of the real formats' colours
README_TEMPLATE = """\
# {name}

{model} exported by edgekit {version} to fake-int4, the test suite's format (no weights; seed {seed},
logit spread {scale}). Checkpoint sha256: `{sha}`. Files and hashes: `manifest.json`.

## Measured

{figures}
"""
KV_ELEMENT_BYTES = 4  # what the fake would hold per K/V element, were it a model: float32


def readme_fields(manifest: dict[str, Any]) -> dict[str, str]:
    q = manifest.get("quantization", {})
    return {"seed": str(q.get("seed", 0)), "scale": str(q.get("scale", 0.0))}


def card_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"library_name": "fake", "tags": [NAME, "int4"]}


def config_problems(config: dict[str, Any]) -> list[str]:
    return []


def why_not_streamed_export(checkpoint: Any, recipe: Any) -> str | None:
    return None


def bench_setup(bundle: Path, manifest: dict[str, Any], profile: Any) -> BenchSetup:
    return BenchSetup(
        context_limit=None, kv_element_bytes=KV_ELEMENT_BYTES, gpu_layers=0, accuracy_level=None, substitutions=()
    )


def bench_runtime(bundle: Path, manifest: dict[str, Any], context: int, gpu_layers: int) -> BenchRuntime:
    return BenchRuntime(versions=tool_versions(), gpu_layers=0, substitutions=())


def bench_session(bundle: Path, manifest: dict[str, Any], threads: int, context: int, gpu_layers: int) -> FakeSession:
    return open_session(bundle, manifest, threads)


def write_plugin(root: Path) -> tuple[Path, Path]:
    """The fake target's directory and the sitecustomize directory, under root."""
    targets, site = root / "targets", root / "site"
    targets.mkdir(parents=True, exist_ok=True)
    site.mkdir(parents=True, exist_ok=True)
    (targets / f"{NAME}.toml").write_text(TARGET_TOML, encoding="utf-8")
    (targets / "profiles.toml").write_text(PROFILES_TOML, encoding="utf-8")
    (site / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(tests=str(Path(__file__).resolve().parent), name=NAME), encoding="utf-8"
    )
    return targets, site


@pytest.fixture
def fake_format(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Register fake-int4 here and in every child process; yields its targets directory."""
    import os

    from edgekit.targets import USER_DIR_ENV

    targets, site = write_plugin(tmp_path_factory.mktemp("fakeformat"))
    monkeypatch.setitem(REGISTRY, NAME, "fakeformat")
    monkeypatch.setenv(USER_DIR_ENV, str(targets))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*paths, str(site)]))  # the worktree first, as before
    yield targets
