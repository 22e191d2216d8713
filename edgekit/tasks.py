"""Task files for `edgekit eval`: JSONL, one item per line, checked before any model loads.

An item:

    {"id": "capital-fr-raw", "prompt": "The capital of France is", "expected": "Paris",
     "match": "contains", "max_tokens": 8, "group": "capital-fr"}
    {"id": "capital-fr-chat", "messages": [{"role": "user", "content": "Capital of France?"}],
     "system": "Answer in one word.", "expected": ["Paris"], "match": "exact", "group": "capital-fr"}
    {"id": "capital-fr-mc", "prompt": "The capital of France is", "match": "choice",
     "choices": ["Paris", "Lyon", "Rome"], "expected": "Paris", "group": "capital-fr"}

- `prompt` is sent as raw text (the runtime's tokens, no BOS added, like `edgekit run --raw`);
  `messages` go through each bundle's own chat template; exactly one of the two.
- `expected`: one accepted answer or a list. `match`: `exact`, `contains`, `regex` (Python
  `re.search` on the answer as generated, not normalised; `(?i)` for case) or `choice`.
- `choice` items need `choices`; every expected answer must be one of them. They are scored by
  the summed log-likelihood of each choice after the prompt, not by generation.
- `max_tokens` (default 32, or the file's option), `system` (chat items only), `group`: items
  asking the same thing in other words or formats (paraphrase drop, format sensitivity).

Normalisation for `exact` and `contains` (both sides): `case` folds case, `whitespace`
collapses runs to one space and strips the ends, `punctuation` strips trailing (and leading)
punctuation and quotes: `"Paris."` == `paris`. All three are on by default; an options row
`{"options": {"normalize": {"case": false}, "max_tokens": 16}}` before the first item, or
the CLI's --case-sensitive / --keep-whitespace / --keep-punctuation, turns them off.
Blank lines and lines starting with `#` are skipped (a licence header, comments).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import BadInput

MATCHES = ("exact", "contains", "regex", "choice")
ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 32
MAX_TOKENS_LIMIT = 4096
SHIPPED = "edgekit-basic"
_ITEM_KEYS = {"id", "prompt", "messages", "expected", "match", "choices", "max_tokens", "system", "group"}
_OPTION_KEYS = {"normalize", "max_tokens"}
_NORMALIZE_KEYS = {"case", "whitespace", "punctuation"}
# Stripped from both ends by the punctuation rule; inner punctuation ("3.14", "U.S.") stays.
_EDGE_PUNCT = ".,;:!?\"'`()[]{}*_«»“”‘’…"


@dataclass(frozen=True)
class Normalization:
    case: bool = True
    whitespace: bool = True
    punctuation: bool = True

    def apply(self, text: str) -> str:
        if self.whitespace:
            text = " ".join(text.split())
        if self.punctuation:
            text = text.strip(_EDGE_PUNCT + (" " if self.whitespace else ""))
        if self.case:
            text = text.casefold()
        return text


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Task:
    id: str
    line: int
    expected: tuple[str, ...]
    match: str
    max_tokens: int
    prompt: str | None = None
    messages: tuple[Message, ...] = ()
    choices: tuple[str, ...] = ()
    system: str | None = None
    group: str | None = None

    @property
    def kind(self) -> str:
        return "raw" if self.prompt is not None else "chat"

    @property
    def format(self) -> str:
        """The item's format for format sensitivity: how it is asked and how it is scored."""
        return f"{self.kind}/{self.match}"

    def chat(self) -> list[dict[str, str]]:
        """The conversation sent to a chat template (system first when given)."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": m.role, "content": m.content} for m in self.messages]

    def to_job(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "prompt": self.prompt,
            "messages": self.chat(),
            "match": self.match,
            "choices": list(self.choices),
            "max_tokens": self.max_tokens,
        }


@dataclass(frozen=True)
class TaskSet:
    path: str
    name: str
    sha256: str  # of the file's bytes: the reuse key of a build and the manifest's key
    normalization: Normalization
    tasks: tuple[Task, ...] = field(repr=False)
    limit: int | None = None  # only the first `limit` items of the file (when fewer than all)

    @property
    def key(self) -> str:
        """Names the items evaluated: results of different files or limits never mix."""
        key = f"{self.name}@{self.sha256[:12]}" + (f"/first{self.limit}" if self.limit else "")
        off = [k for k in ("case", "whitespace", "punctuation") if not getattr(self.normalization, k)]
        return key + (f"/keep-{'-'.join(off)}" if off else "")


def shipped_path() -> Path:
    return Path(str(resources.files("edgekit").joinpath(f"data/tasks/{SHIPPED}.jsonl")))


def load_tasks(
    path: str | Path | None = None, *, limit: int | None = None, normalization: dict[str, bool] | None = None
) -> TaskSet:
    """Read and check a task file (default: the shipped set). The first `limit` items are kept
    (file order). `normalization` overrides the file's options key by key."""
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1, got {limit}", "Pass a positive number of items")
    p = shipped_path() if path is None else Path(path)
    if not p.is_file():
        raise BadInput(f"--tasks {p} is not a file", "Pass a JSONL task file (one JSON object per line)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{p} is not UTF-8 text", "Save the task file as UTF-8") from None
    norm, default_tokens = Normalization(), DEFAULT_MAX_TOKENS
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{p}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where}: not a JSON object ({e.msg})", "Write one JSON object per line") from None
        if not isinstance(row, dict):
            raise BadInput(f"{where}: not a JSON object", "Write one JSON object per line")
        if "options" in row:
            if tasks or set(row) != {"options"}:
                raise BadInput(
                    f"{where}: an options row must come before the first item and hold only 'options'",
                    "Move it to the top of the file",
                )
            norm, default_tokens = _options(row["options"], where)
            continue
        task = _task(row, where, n, default_tokens)
        if task.id in seen:
            raise BadInput(
                f"{where}: field 'id': duplicate id '{task.id}' (first on line {seen[task.id]})",
                "Give every item its own id",
            )
        seen[task.id] = n
        tasks.append(task)
    if not tasks:
        raise BadInput(
            f"{p}: no items", "Add at least one JSON object per line with id, prompt or messages, expected, match"
        )
    if normalization:
        norm = replace(norm, **{k: v for k, v in normalization.items() if v is not None})
    name = SHIPPED if path is None else p.stem
    limited = limit if limit is not None and limit < len(tasks) else None
    return TaskSet(
        path=str(p),
        name=name,
        sha256=hashlib.sha256(raw).hexdigest(),
        normalization=norm,
        tasks=tuple(tasks[:limited] if limited else tasks),
        limit=limited,
    )


def _options(opts: Any, where: str) -> tuple[Normalization, int]:
    if not isinstance(opts, dict):
        raise BadInput(f"{where}: field 'options' must be an object", 'Write {"options": {"normalize": {...}}}')
    _unknown(opts, _OPTION_KEYS, where, "options.")
    norm = opts.get("normalize", {})
    if not isinstance(norm, dict):
        raise BadInput(f"{where}: field 'options.normalize' must be an object", 'Write {"case": true, ...}')
    _unknown(norm, _NORMALIZE_KEYS, where, "options.normalize.")
    for k, v in norm.items():
        if not isinstance(v, bool):
            raise BadInput(f"{where}: field 'options.normalize.{k}' must be true or false, got {v!r}", f"Fix {k}")
    tokens = _max_tokens(opts.get("max_tokens", DEFAULT_MAX_TOKENS), where, "options.max_tokens")
    return Normalization(**norm), tokens


def _unknown(row: dict[str, Any], allowed: set[str], where: str, prefix: str = "") -> None:
    for key in row:
        if key not in allowed:
            raise BadInput(f"{where}: unknown field '{prefix}{key}'", f"Allowed: {', '.join(sorted(allowed))}")


def _text(row: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise BadInput(f"{where}: field '{key}' is missing", f'Add "{key}"')
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{where}: field '{key}' must be a non-empty string, got {value!r}", f"Fix {key}")
    return value


def _max_tokens(value: Any, where: str, key: str = "max_tokens") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS_LIMIT:
        raise BadInput(
            f"{where}: field '{key}' must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {value!r}", f"Fix {key}"
        )
    return value


def _strings(row: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = row.get(key)
    if value is None:
        raise BadInput(f"{where}: field '{key}' is missing", f'Add "{key}"')
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) and x.strip() for x in items):
        raise BadInput(
            f"{where}: field '{key}' must be a non-empty string or a list of them, got {value!r}", f"Fix {key}"
        )
    return tuple(items)


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise BadInput(
            f'{where}: field \'messages\' must be a non-empty list of {{"role", "content"}} objects', "Fix messages"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise BadInput(
                f"{where}: field 'messages[{i}]' must be an object with exactly 'role' and 'content'", "Fix messages"
            )
        if m["role"] not in ROLES:
            raise BadInput(f"{where}: field 'messages[{i}].role' is {m['role']!r}", f"Use one of: {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise BadInput(f"{where}: field 'messages[{i}].content' must be a non-empty string", "Fix messages")
        out.append(Message(m["role"], m["content"]))
    if out[-1].role != "user":
        raise BadInput(f"{where}: field 'messages': the last message must be the user's", "End with a user message")
    return tuple(out)


def _task(row: dict[str, Any], where: str, line: int, default_tokens: int) -> Task:
    _unknown(row, _ITEM_KEYS, where)
    tid = _text(row, "id", where, required=True)
    assert tid is not None  # required=True raises instead of returning None
    if tid != tid.strip() or len(tid) > 200:
        raise BadInput(f"{where}: field 'id' must have no surrounding spaces and at most 200 characters", "Fix id")
    if ("prompt" in row) == ("messages" in row):
        raise BadInput(
            f"{where}: item '{tid}' needs exactly one of field 'prompt' (raw text) or 'messages' (chat)",
            "Give one of them",
        )
    prompt = _text(row, "prompt", where)
    messages = _messages(row["messages"], where) if "messages" in row else ()
    system = _text(row, "system", where)
    if system is not None and prompt is not None:
        raise BadInput(f"{where}: field 'system' applies to chat items only", "Use messages, or put it in the prompt")
    if any(m.role == "system" for m in messages) and system is not None:
        raise BadInput(f"{where}: field 'system' given twice (also in messages)", "Keep one")
    match = row.get("match")
    if match not in MATCHES:
        raise BadInput(f"{where}: field 'match' must be one of {', '.join(MATCHES)}, got {match!r}", "Fix match")
    expected = _strings(row, "expected", where)
    choices: tuple[str, ...] = ()
    if match == "choice":
        choices = _strings(row, "choices", where)
        if len(choices) < 2:
            raise BadInput(f"{where}: field 'choices' needs at least two choices", "Add choices")
        if len(set(choices)) != len(choices):
            raise BadInput(f"{where}: field 'choices' lists a choice twice", "Remove the duplicate")
        missing = [e for e in expected if e not in choices]
        if missing:
            raise BadInput(
                f"{where}: field 'expected': {missing[0]!r} is not one of the choices", "Fix expected or choices"
            )
    elif "choices" in row:
        raise BadInput(f"{where}: field 'choices' is only for match \"choice\"", "Remove it or set match to choice")
    elif match == "regex":
        for pattern in expected:
            try:
                re.compile(pattern)
            except re.error as e:
                raise BadInput(f"{where}: field 'expected': bad regex {pattern!r} ({e})", "Fix the pattern") from None
    tokens = _max_tokens(row.get("max_tokens", default_tokens), where)
    group = row.get("group")
    if group is not None and (not isinstance(group, str) or not group.strip()):
        raise BadInput(f"{where}: field 'group' must be a non-empty string, got {group!r}", "Fix group")
    return Task(
        id=tid,
        line=line,
        expected=expected,
        match=match,
        max_tokens=tokens,
        prompt=prompt,
        messages=messages,
        choices=choices,
        system=system,
        group=group,
    )


def is_correct(task: Task, answer: str, norm: Normalization) -> bool:
    """Whether a generated answer (or, for choice items, the chosen choice) is accepted."""
    if task.match == "choice":
        return answer in task.expected
    if task.match == "regex":
        return any(re.search(p, answer) for p in task.expected)
    got = norm.apply(answer)
    if task.match == "exact":
        return any(got == norm.apply(e) for e in task.expected)
    return any(norm.apply(e) in got for e in task.expected)


def choice_continuation(task: Task, choice: str) -> str:
    """The text scored after the prompt for one choice. A raw prompt that does not end in
    whitespace gets one space before the choice, so "... is" + "Paris" is scored as " Paris",
    the token a model actually predicts there; after a chat prompt the reply starts as is."""
    if task.kind == "raw" and not (task.prompt or "")[-1:].isspace() and not choice[:1].isspace():
        return " " + choice
    return choice
