"""An Ollama Modelfile for a GGUF bundle, so `ollama create NAME -f Modelfile` works on it.

Ollama does not run the Hugging Face Jinja chat template; it needs its own Go-template
translation. We recognise the known chat families by their markers and write the matching
template, its stop tokens, and the default system prompt the Hugging Face template injects
(rendered, not guessed). An unknown family gets a Modelfile without TEMPLATE and a comment
saying so, rather than a wrong translation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ChatFamily:
    name: str
    marker: str  # a string only this family's Jinja template contains
    template: str  # Ollama (Go text/template) over .Messages
    stops: tuple[str, ...]
    system_block: str | None  # regex capturing a system prompt in the rendered HF template


_SENTINEL = "EDGEKIT_SENTINEL_USER_MESSAGE"

# Ollama prepends the Modelfile's SYSTEM to .Messages when a request has no system message,
# so every template ranges over .Messages alone.
FAMILIES: tuple[ChatFamily, ...] = (
    # ChatML: SmolLM2, Qwen2/2.5 (both inject a default system prompt, captured as SYSTEM).
    ChatFamily(
        "chatml",
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
        r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
    ),
    # Llama 3 / 3.1 / 3.2 headers; BOS is added by llama.cpp's tokenizer, not the template.
    ChatFamily(
        "llama3",
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    ),
    # Phi-3 / 3.5 / 4-mini: <|role|> tags closed by <|end|>.
    ChatFamily(
        "phi3",
        "<|assistant|>",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>"),
        r"<\|system\|>\n(.*?)<\|end\|>",
    ),
    # Gemma 2 / 3: "model" for the assistant. Hugging Face folds a system message into the first
    # user turn; Go templates cannot carry that across iterations cleanly, so (like Ollama's
    # own Gemma templates) a system message becomes a user turn of its own.
    ChatFamily(
        "gemma",
        "<start_of_turn>",
        '{{- range .Messages }}{{ if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
        "{{ else }}<start_of_turn>user\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n",
        ("<start_of_turn>", "<end_of_turn>"),
        None,
    ),
)


def detect_family(chat_template: str | None) -> ChatFamily | None:
    if not chat_template:
        return None
    for fam in FAMILIES:
        if fam.marker in chat_template:
            return fam
    return None


def default_system_prompt(render: Any, family: ChatFamily) -> str | None:
    """The system prompt the HF template adds when the user gives none (SmolLM2, Qwen2.5)."""
    if family.system_block is None:
        return None
    text = render([{"role": "user", "content": _SENTINEL}])
    m = re.search(family.system_block, text, re.S)
    if m and _SENTINEL not in m.group(1):
        return m.group(1)
    return None


def _quote(text: str) -> str:
    # Modelfile values use triple quotes; a prompt containing them cannot be expressed.
    if '"""' in text:
        raise ValueError('text contains """')
    return f'"""{text}"""'


def render_modelfile(
    model_file: str,
    chat_template: str | None,
    vocab: set[str],
    render: Callable[[list[dict[str, str]]], str] | None = None,
) -> tuple[str, str | None]:
    """Modelfile text and the family name (None when the template was not translated).

    `vocab` holds the model's token strings: a stop token the model does not have is left out.
    `render(messages) -> str` applies the HF chat template (for the default system prompt)."""
    fam = detect_family(chat_template)
    lines = [
        "# Ollama Modelfile written by edgekit: `ollama create <name> -f Modelfile` in this directory.",
        f"FROM ./{model_file}",
    ]
    if fam is None:
        why = (
            "it has no chat template"
            if not chat_template
            else "its chat template is not a known family (ChatML, Llama 3, Phi-3, Gemma)"
        )
        lines.append(f"# No TEMPLATE: {why}; Ollama will send prompts as raw text.")
        return "\n".join(lines) + "\n", None
    lines.append(f"# Chat template: the {fam.name} family, translated from the checkpoint's Jinja template.")
    lines.append(f"TEMPLATE {_quote(fam.template)}")
    system = default_system_prompt(render, fam) if render else None
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for stop in fam.stops:
        if stop in vocab:
            lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n", fam.name


def _hf_template_and_vocab(checkpoint_dir: Path) -> tuple[str | None, set[str], dict[str, str]]:
    """The chat template, token strings and special tokens, read from the tokenizer files
    directly: importing transformers for this costs ~5 s per export (export_overhead.py)."""
    import json

    cfg_path = checkpoint_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (checkpoint_dir / "chat_template.jinja").is_file():
        template = (checkpoint_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif (checkpoint_dir / "chat_template.json").is_file():
        template = json.loads((checkpoint_dir / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    tok = json.loads((checkpoint_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok.get("model", {}).get("vocab", {})
    names = set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab}  # BPE dict / Unigram pairs
    names |= {t["content"] for t in tok.get("added_tokens", [])}

    def content(v):
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    special = {k: content(cfg.get(k)) for k in ("bos_token", "eos_token")}
    return (template if isinstance(template, str) else None), names, special


def _jinja_render(template: str, special: dict[str, str]) -> Callable[[list[dict[str, str]]], str]:
    """Render like transformers' apply_chat_template: sandboxed Jinja, trim/lstrip blocks."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages):
        return compiled.render(messages=messages, add_generation_prompt=True, **special)

    return render


def write_modelfile(checkpoint_dir: Path, bundle: Path, model_file: str) -> str | None:
    """Write bundle/Modelfile from the checkpoint's tokenizer files; returns the family or None."""
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / "tokenizer.json").is_file():
        template, vocab, special = _hf_template_and_vocab(checkpoint_dir)
        render = _jinja_render(template, special) if template else None
    else:  # SentencePiece-only checkpoint: let transformers read tokenizer.model
        from .hftokenizer import load_tokenizer

        tok = load_tokenizer(checkpoint_dir)
        template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
        vocab = set(tok.get_vocab())

        def render(messages):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    text, family = render_modelfile(model_file, template, vocab, render)
    (Path(bundle) / "Modelfile").write_text(text, encoding="utf-8")
    return family
