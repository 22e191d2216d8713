"""Task files: the shipped set loads, every bad row is one line naming file:line and the field
(exit 2 through the console script, before any model loads), normalisation as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.errors import BadInput
from edgekit.tasks import Normalization, is_correct, load_tasks

EDGEKIT = [str(Path(sys.executable).parent / "edgekit")]
GOOD = {"id": "a", "prompt": "The capital of France is", "expected": "Paris", "match": "contains"}


def _file(tmp_path: Path, *rows, name="t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_shipped_set_is_large_grouped_and_licensed():
    from edgekit.tasks import shipped_path

    ts = load_tasks()
    assert len(ts.tasks) >= 150
    assert ts.name == "edgekit-basic" and ts.key.startswith("edgekit-basic@")
    assert {t.match for t in ts.tasks} == {"exact", "contains", "regex", "choice"}
    assert {t.kind for t in ts.tasks} == {"raw", "chat"}
    groups: dict = {}
    for t in ts.tasks:
        groups.setdefault(t.group, []).append(t.format)
    assert None not in groups and all(len(f) >= 3 for f in groups.values())  # every question has variants
    assert sum(len(set(f)) >= 2 for f in groups.values()) >= 30  # format variants within groups
    assert "Apache-2.0" in shipped_path().read_text().splitlines()[1]


def test_limit_and_key(tmp_path):
    p = _file(tmp_path, GOOD, {**GOOD, "id": "b"}, {**GOOD, "id": "c"})
    full, two = load_tasks(p), load_tasks(p, limit=2)
    assert [t.id for t in two.tasks] == ["a", "b"] and two.key != full.key and two.sha256 == full.sha256
    assert load_tasks(p, limit=10).key == full.key  # a limit above the size is no limit
    assert full.tasks[0].line == 1


BAD = [
    ("not json", ["{oops"], "t.jsonl:1: not a JSON object"),
    ("array row", ["[1, 2]"], "t.jsonl:1: not a JSON object"),
    ("missing id", [{k: v for k, v in GOOD.items() if k != "id"}], "t.jsonl:1: field 'id' is missing"),
    ("duplicate id", [GOOD, "", {**GOOD}], "t.jsonl:3: field 'id': duplicate id 'a' (first on line 1)"),
    ("unknown key", [{**GOOD, "answer": "x"}], "t.jsonl:1: unknown field 'answer'"),
    (
        "both prompt and messages",
        [{**GOOD, "messages": [{"role": "user", "content": "hi"}]}],
        "exactly one of field 'prompt'",
    ),
    ("neither", [{k: v for k, v in GOOD.items() if k != "prompt"}], "exactly one of field 'prompt'"),
    ("bad match", [{**GOOD, "match": "fuzzy"}], "field 'match' must be one of"),
    ("bad regex", [{**GOOD, "match": "regex", "expected": "(unclosed"}], "field 'expected': bad regex"),
    ("choice without choices", [{**GOOD, "match": "choice"}], "field 'choices' is missing"),
    (
        "expected not a choice",
        [{**GOOD, "match": "choice", "choices": ["Lyon", "Rome"]}],
        "field 'expected': 'Paris' is not one of the choices",
    ),
    ("one choice", [{**GOOD, "match": "choice", "choices": ["Paris"]}], "field 'choices' needs at least two"),
    ("choices on contains", [{**GOOD, "choices": ["Paris", "Rome"]}], "field 'choices' is only for match"),
    ("empty expected", [{**GOOD, "expected": []}], "field 'expected' must be a non-empty string or a list"),
    ("max_tokens zero", [{**GOOD, "max_tokens": 0}], "field 'max_tokens' must be an integer"),
    ("max_tokens bool", [{**GOOD, "max_tokens": True}], "field 'max_tokens' must be an integer"),
    ("system on raw", [{**GOOD, "system": "be brief"}], "field 'system' applies to chat items only"),
    (
        "bad role",
        [{"id": "a", "messages": [{"role": "bot", "content": "x"}], "expected": "x", "match": "exact"}],
        "field 'messages[0].role'",
    ),
    (
        "last message not user",
        [
            {
                "id": "a",
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                "expected": "x",
                "match": "exact",
            }
        ],
        "the last message must be the user's",
    ),
    ("empty group", [{**GOOD, "group": ""}], "field 'group' must be a non-empty string"),
    ("late options row", [GOOD, {"options": {"max_tokens": 4}}], "t.jsonl:2: an options row must come before"),
    ("unknown option", [{"options": {"normalise": {}}}], "unknown field 'options.normalise'"),
    ("no items", ["# only a comment"], "t.jsonl: no items"),
]


@pytest.mark.parametrize("case, rows, message", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_line_and_field(tmp_path, case, rows, message):
    p = _file(tmp_path, *rows)
    with pytest.raises(BadInput) as e:
        load_tasks(p)
    assert message in e.value.one_line()
    assert e.value.exit_code == 2


def test_bad_task_file_through_the_console_script_exits_2_before_any_model(tmp_path):
    p = _file(tmp_path, GOOD, {**GOOD, "id": "b", "match": "regex", "expected": "[z-a]"})
    # The bundle does not exist either: the task file is checked first, so its line is the error.
    r = subprocess.run(
        [*EDGEKIT, "eval", str(tmp_path / "no-such-bundle"), "--tasks", str(p)], capture_output=True, text=True
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{p}:2: field 'expected': bad regex" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = subprocess.run(
        [*EDGEKIT, "select", "--tasks", str(tmp_path / "missing.jsonl"), "--min-accuracy", "0.5"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "is not a file" in r.stderr


def test_normalisation_documented_rules_and_switches(tmp_path):
    n = Normalization()
    assert n.apply('  "Paris."  ') == "paris"
    assert n.apply("New   York\n City!") == "new york city"
    assert n.apply("3.14") == "3.14"  # inner punctuation stays
    exact = load_tasks(_file(tmp_path, {**GOOD, "match": "exact"})).tasks[0]
    assert is_correct(exact, " Paris.", n) and not is_correct(exact, "Paris is", n)
    assert not is_correct(exact, "paris", Normalization(case=False))
    assert not is_correct(exact, "Paris.", Normalization(punctuation=False))
    contains = load_tasks(_file(tmp_path, GOOD, name="c.jsonl")).tasks[0]
    assert is_correct(contains, "It is PARIS, of course", n)
    # file options, and the CLI-level override winning over them
    p = _file(tmp_path, {"options": {"normalize": {"case": False}, "max_tokens": 5}}, GOOD, name="o.jsonl")
    ts = load_tasks(p)
    assert ts.normalization == Normalization(case=False) and ts.tasks[0].max_tokens == 5
    assert load_tasks(p, normalization={"case": True, "whitespace": None}).normalization == Normalization()


def test_regex_and_choice_scoring(tmp_path):
    rx = load_tasks(_file(tmp_path, {**GOOD, "match": "regex", "expected": [r"(?<!\d)4(?!\d)"]})).tasks[0]
    assert is_correct(rx, " 4.", Normalization()) and not is_correct(rx, "14", Normalization())
    ch = load_tasks(_file(tmp_path, {**GOOD, "match": "choice", "choices": ["Paris", "Rome"]}, name="m.jsonl")).tasks[0]
    assert is_correct(ch, "Paris", Normalization()) and not is_correct(ch, "Rome", Normalization())
    from edgekit.tasks import choice_continuation

    assert choice_continuation(ch, "Paris") == " Paris"  # raw prompt without trailing space
    chat = load_tasks(
        _file(
            tmp_path,
            {
                "id": "c",
                "messages": [{"role": "user", "content": "Capital?"}],
                "system": "Be brief.",
                "expected": "Paris",
                "match": "choice",
                "choices": ["Paris", "Rome"],
            },
            name="k.jsonl",
        )
    ).tasks[0]
    assert choice_continuation(chat, "Paris") == "Paris"
    assert chat.chat()[0] == {"role": "system", "content": "Be brief."} and chat.format == "chat/choice"


def test_key_separates_limits_and_normalisation(tmp_path):
    p = _file(tmp_path, GOOD, {**GOOD, "id": "b"})
    keys = {load_tasks(p).key, load_tasks(p, limit=1).key, load_tasks(p, normalization={"case": False}).key}
    assert len(keys) == 3  # results of different items or scoring never share a manifest entry
