"""Tokenizers for edgekit.tiny's checkpoints: SentencePiece vocabularies trained here on CORPUS,
or SmolLM2's byte-level BPE (the one llama.cpp's converter recognises by hash) with a family's
chat tokens. Split from tiny.py so the family table and the model writer read on their own."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class FamilyLike(Protocol):
    """What a tokenizer builder reads of an edgekit.tiny Family row (a frozen dataclass)."""

    @property
    def name(self) -> str: ...
    @property
    def tokenizer(self) -> str: ...
    @property
    def chat_template(self) -> str: ...
    @property
    def config(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Tokens:
    """What the model config and generation config must agree on with the tokenizer."""

    count: int  # len(tokenizer): the embedding needs at least this many rows
    bos: int | None
    eos: int
    pad: int | None
    stop: list[int]  # generation eos ids: end of text and end of turn


@dataclass(frozen=True)
class SpmRecipe:
    fast_class: str  # transformers class that converts the .model to tokenizer.json
    vocab_size: int  # SentencePiece vocabulary, before added tokens
    trainer: dict[str, Any]  # special-piece layout and options of the real tokenizer
    bos: str
    eos: str
    unk: str
    pad: str | None
    add_bos: bool
    special: tuple[str, ...] = ()  # special tokens; new ones are appended in this order
    rstrip: tuple[str, ...] = ()  # special tokens that swallow the whitespace after them
    stop: tuple[str, ...] = ()  # extra generation stop tokens besides eos


# The Llama SentencePiece layout: <unk>=0 <s>=1 </s>=2, then 256 byte-fallback pieces.
_LLAMA_IDS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)

# Phi-3's chat tokens come after the SentencePiece vocabulary, in the real model's id order.
_PHI3_ADDED = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)

SPM_RECIPES: dict[str, SpmRecipe] = {
    # Phi-3: Llama vocabulary; eos is <|endoftext|>; no BOS added (as in the current Phi-3
    # tokenizer_config). Chat tokens swallow the newline after them (rstrip), as in the real
    # tokenizer.json; llama.cpp copies that for models whose name contains "phi3" / "phi-3".
    "phi3": SpmRecipe(
        "LlamaTokenizerFast",
        480,
        _LLAMA_IDS,
        bos="<s>",
        eos="<|endoftext|>",
        unk="<unk>",
        pad="<|endoftext|>",
        add_bos=False,
        special=_PHI3_ADDED,
        rstrip=_PHI3_ADDED[1:],
        stop=("<|assistant|>", "<|end|>"),
    ),
    # Llama 2: BOS added to every encode, no pad token.
    "llama": SpmRecipe(
        "LlamaTokenizerFast", 512, _LLAMA_IDS, bos="<s>", eos="</s>", unk="<unk>", pad=None, add_bos=True
    ),
    # Mistral v0.3: [INST] / [/INST] are control pieces inside the SentencePiece model (ids 3, 4).
    "mistral": SpmRecipe(
        "LlamaTokenizerFast",
        512,
        {**_LLAMA_IDS, "control_symbols": ["[INST]", "[/INST]"]},
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        pad=None,
        add_bos=True,
        special=("[INST]", "[/INST]"),
    ),
    # Gemma: <pad>=0 <eos>=1 <bos>=2 <unk>=3, no dummy prefix, turn markers in the vocabulary.
    "gemma": SpmRecipe(
        "GemmaTokenizerFast",
        512,
        dict(
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            add_dummy_prefix=False,
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        ),
        bos="<bos>",
        eos="<eos>",
        unk="<unk>",
        pad="<pad>",
        add_bos=True,
        special=("<start_of_turn>", "<end_of_turn>"),
        stop=("<end_of_turn>",),
    ),
}


def _spm_tokenizer(fam: FamilyLike, out: Path) -> Tokens:
    import tempfile

    import transformers
    from transformers import AddedToken

    recipe = SPM_RECIPES[fam.tokenizer]
    with tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / "tokenizer.model"
        model_file.write_bytes(_train_sentencepiece(recipe.vocab_size, recipe.trainer))
        cls = getattr(transformers, recipe.fast_class)
        tok = cls(
            vocab_file=str(model_file),
            from_slow=True,
            add_bos_token=recipe.add_bos,
            add_eos_token=False,
            # legacy: a "▁" before the text and again after every special token, which is
            # what llama.cpp and onnxruntime-genai do (non-legacy differs after specials).
            # add_prefix_space must be explicit: left unset, the converter adds none at all.
            legacy=True,
            add_prefix_space=True,
            bos_token=recipe.bos,
            unk_token=recipe.unk,
        )
        tok.add_tokens(
            [AddedToken(t, special=True, normalized=False, rstrip=t in recipe.rstrip) for t in recipe.special],
            special_tokens=True,
        )
        tok.eos_token = recipe.eos
        tok.pad_token = recipe.pad
        tok.chat_template = fam.chat_template
        tok.model_max_length = fam.config.get("max_position_embeddings", 4096)
        # Keep the template inside tokenizer_config.json: llama.cpp's converter and the
        # onnxruntime-genai tokenizer read it there, not from chat_template.jinja.
        tok.save_pretrained(out, save_jinja_files=False)
    return _tokens_of(tok, [recipe.eos, *recipe.stop])


def _train_sentencepiece(vocab_size: int, layout: dict[str, Any]) -> bytes:
    """A BPE SentencePiece model trained on CORPUS, with Llama-style byte fallback.

    One thread and an in-memory writer keep it deterministic (no paths in the trainer spec).
    """
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.strip().splitlines()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        num_threads=1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
        **layout,
    )
    return buf.getvalue()


def _smollm2_tokenizer(fam: FamilyLike, out: Path) -> Tokens:
    """Copy the repaired SmolLM2 byte-level BPE tokenizer and give it the family's template.

    Files are copied byte for byte (not re-saved) so that the repairs edgekit.embedded made,
    which llama.cpp's pre-tokenizer hash depends on, stay exactly as they are.
    """
    from transformers import AutoTokenizer

    from .embedded import ensure_checkpoint

    src = ensure_checkpoint("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(src / name, out / name)
    patch_json(out / "tokenizer_config.json", chat_template=fam.chat_template)
    tok = AutoTokenizer.from_pretrained(out)
    return _tokens_of(tok, [tok.eos_token])


def _smollm2_phi4_tokenizer(fam: FamilyLike, out: Path) -> Tokens:
    """SmolLM2's byte-level BPE with Phi-4-mini's chat tokens added after it, eos
    <|endoftext|> and <|end|> as the end of a turn, like the real Phi-4-mini tokenizer.

    Re-saved through transformers (adding tokens needs it); the pre-tokenizer and decoder
    repairs survive that, which the llama.cpp conversion test checks."""
    from transformers import AddedToken, AutoTokenizer

    _smollm2_tokenizer(fam, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in _PHI3_ADDED if t not in tok.get_vocab()],
        special_tokens=True,
    )
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.chat_template = fam.chat_template
    tok.save_pretrained(out, save_jinja_files=False)
    return _tokens_of(tok, ["<|endoftext|>", "<|end|>"])


def _tokens_of(tok: Any, stop: list[str]) -> Tokens:
    return Tokens(
        count=len(tok),
        bos=tok.bos_token_id,
        eos=tok.eos_token_id,
        pad=tok.pad_token_id,
        stop=[tok.convert_tokens_to_ids(t) for t in stop],
    )


TOKENIZERS = {
    "phi3": _spm_tokenizer,
    "llama": _spm_tokenizer,
    "mistral": _spm_tokenizer,
    "gemma": _spm_tokenizer,
    "smollm2": _smollm2_tokenizer,
    "smollm2-phi4": _smollm2_phi4_tokenizer,
}


CORPUS = """
The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is Rome.
You are a helpful assistant. Answer the question briefly and politely.
What is the weather like today? It is sunny and warm, with a light breeze from the west.
Please write a short story about a cat who learns to play the piano.
Once upon a time there was a small village at the edge of a large forest.
The people of the village were farmers, and every morning they walked to their fields.
A language model predicts the next token from the tokens that came before it.
Quantization stores each weight in four bits, which makes the model smaller and faster.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
def add(a, b):
    return a + b
for i in range(10):
    print(i * 2, "items")
class Model:
    def __init__(self, name: str) -> None:
        self.name = name
if x > 0 and y < 100: result = [x, y, {"key": 'value'}]
The numbers are 0 1 2 3 4 5 6 7 8 9, and 42, 2024, 3.14159 and 1e-5.
Email me at user@example.com or visit https://example.com/path?query=1#top.
Symbols: ! " # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~
ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz
Hello, how are you? I am fine, thank you. And you? Very well, thanks for asking.
The user asked the assistant a question, and the assistant answered with a clear explanation.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
The sun rises in the east and sets in the west. The moon orbits the earth once a month.
Machine learning models are trained on data and evaluated on held out examples.
She opened the window, looked at the garden, and smiled at the flowers in the morning light.
He said that the train would arrive at seven o'clock, but it was late again.
Summarize the following text in one sentence. Translate this sentence into French.
Bonjour, comment allez-vous? Je vais bien, merci. Où est la gare? Voilà le café.
Tokens, tokenizers and vocabularies: the words are split into pieces and bytes.
Export the model, verify the parity, then measure the speed and the memory on the device.
The export produced a bundle with the model files, the tokenizer and the chat template.
In the beginning the universe was created. This has made a lot of people very angry.
It was the best of times, it was the worst of times, it was the age of wisdom.
All happy families are alike; each unhappy family is unhappy in its own way.
Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail.
import numpy as np
x = np.zeros((3, 4), dtype=np.float32)
while True:
    line = input("> ")
    if not line:
        break
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY name;
"""


def patch_json(path: Path, **updates: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Training text for the SentencePiece vocabularies: English prose, chat phrasing, code and
# digits, so that common words get merges and the tokenizers behave like real ones on tests.
