"""The Ollama Modelfile's template, rendered the way Ollama renders it, must give exactly the
prompt the checkpoint's own Hugging Face chat template gives."""

from __future__ import annotations

import re

import pytest

from edgekit.modelfile import detect_family, render_modelfile
from edgekit.tiny import FAMILIES as TINY

_TOKEN = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """The subset of Go's text/template that edgekit's templates use: range .Messages, if eq .Role
    "x" / else / end, .Role, .Content, and {{- -}} whitespace trimming."""
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip(" \t\n")
        if parts and parts[-1][0] == "trim_next":
            text = text.lstrip(" \t\n")
            parts.pop()
        parts.append(("text", text))
        parts.append(("action", m.group(2)))
        if m.group(3):
            parts.append(("trim_next", ""))
        pos = m.end()
    tail = template[pos:]
    if parts and parts[-1][0] == "trim_next":
        tail = tail.lstrip(" \t\n")
        parts.pop()
    parts.append(("text", tail))

    def run(i: int, msg: dict[str, str] | None, out: list[str], stop: tuple[str, ...]) -> int:
        while i < len(parts):
            kind, val = parts[i]
            if kind == "text":
                out.append(val)
                i += 1
            elif val in stop:
                return i
            elif val == "range .Messages":
                start = i + 1
                end = i + 1
                for message in messages:
                    end = run(start, message, out, ("end",))
                if not messages:
                    end = run(start, None, [], ("end",))
                i = end + 1
            elif val.startswith("if eq .Role"):
                want = val.split('"')[1]
                branch: list[str] = []
                other: list[str] = []
                j = run(i + 1, msg, branch, ("else", "end"))
                if parts[j][1] == "else":
                    j = run(j + 1, msg, other, ("end",))
                out.extend(branch if msg and msg["role"] == want else other)
                i = j + 1
            elif val == ".Role":
                out.append(msg["role"])
                i += 1
            elif val == ".Content":
                out.append(msg["content"])
                i += 1
            else:
                raise AssertionError(f"unsupported action {val!r}")
        return i

    out: list[str] = []
    run(0, None, out, ())
    return "".join(out)


CONVERSATION = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Name a prime.\nJust one."},
]


def _hf(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token or ""
    if "bos_token" in tok.chat_template and bos and text.startswith(bos):
        return text[len(bos) :]  # a template that writes BOS: llama.cpp's tokenizer adds it instead
    return text


@pytest.mark.slow
@pytest.mark.parametrize("family", ["phi3", "qwen2", "gemma3"])
def test_tiny_families_render_like_the_hf_template(tmp_path, family):
    from transformers import AutoTokenizer

    from edgekit.tiny import make_tiny

    path = make_tiny(family, tmp_path / family)
    tok = AutoTokenizer.from_pretrained(str(path))
    # The export's own path (tokenizer files read directly, no transformers), checked against transformers.
    from edgekit.modelfile import write_modelfile

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    fam = write_modelfile(path, bundle, "model.gguf")
    text = (bundle / "Modelfile").read_text()
    assert fam is not None
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S)
    # Ollama puts the Modelfile's SYSTEM in front of a conversation that has none.
    ollama_msgs = ([{"role": "system", "content": system.group(1)}] if system else []) + CONVERSATION
    assert render_go(template, ollama_msgs) == _hf(tok, CONVERSATION)
    stops = re.findall(r'PARAMETER stop "(.*?)"', text)
    assert stops and all(s in tok.get_vocab() for s in stops)
    if family == "qwen2":
        assert system and system.group(1) == "You are a helpful assistant."


@pytest.mark.slow
def test_smollm2_modelfile_carries_its_default_system_prompt(smol_gguf):
    text = (smol_gguf / "Modelfile").read_text()
    assert "FROM ./model.gguf" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_unknown_family_gets_no_template_and_says_why():
    text, fam = render_modelfile("model.gguf", "{{ messages[0]['content'] }}", set())
    assert fam is None and "TEMPLATE" not in text.replace("No TEMPLATE", "")
    assert "not a known family" in text
    assert detect_family(TINY["llama"].chat_template) is None  # Llama 2 [INST]: not translated
