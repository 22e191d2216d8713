"""edgekit select on constructed eval records (no models): Pareto set, the pick, why the others
lost, exit 3 naming the nearest miss, and the --from path through the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.errors import BadInput, GateFailed
from edgekit.select import Constraints, candidates_from, dominates, pareto_front, select

EDGEKIT = [str(Path(sys.executable).parent / "edgekit")]


def rec(name, acc, p95, rss, size_mb, delta=None, fmt="gguf-q4_k_m"):
    return {
        "name": name,
        "format": fmt,
        "accuracy": acc,
        "accuracy_delta": delta,
        "e2e_ms_p95": p95,
        "peak_rss_mb": rss,
        "size_bytes": int(size_mb * 2**20),
    }


RECORDS = [
    rec("dist/a", 0.80, 900, 3000, 2000, delta=-0.01),  # accurate, slow, big
    rec("dist/b", 0.74, 400, 1500, 1000, delta=-0.07),  # fast and small
    rec("dist/c", 0.72, 450, 1600, 1100, delta=-0.09),  # worse than b on every axis
    rec("dist/d", 0.80, 900, 2500, 2000, delta=-0.01),  # a's accuracy, lower RSS: wins the tie
]


def test_dominance_and_front():
    cands = candidates_from(RECORDS)
    by = {c.name: c for c in cands}
    assert dominates(by["dist/b"], by["dist/c"]) and not dominates(by["dist/c"], by["dist/b"])
    assert dominates(by["dist/d"], by["dist/a"])  # same on three axes, better on RSS
    assert not dominates(by["dist/a"], by["dist/a"])
    assert {c.name for c in pareto_front(cands)} == {"dist/b", "dist/d"}


def test_pick_without_constraints_is_most_accurate_with_tie_break_on_rss():
    sel = select(candidates_from(RECORDS), Constraints())
    assert sel.pick == "dist/d"
    why = {v.name: v.reason for v in sel.verdicts}
    assert why["dist/a"] == "dominated by d"
    assert why["dist/c"] == "dominated by b"
    assert why["dist/b"].startswith("less accurate than d (0.740 < 0.800)")
    assert sel.front == ("dist/b", "dist/d")


def test_tie_on_accuracy_and_rss_goes_to_the_smaller_one():
    records = [rec("x", 0.7, 500, 1000, 900), rec("y", 0.7, 400, 1000, 800)]
    assert select(candidates_from(records), Constraints()).pick == "y"
    records = [rec("x", 0.7, 300, 1000, 900), rec("y", 0.7, 400, 1000, 800)]  # neither dominates
    sel = select(candidates_from(records), Constraints())
    assert sel.pick == "y" and "loses the tie" in {v.name: v.reason for v in sel.verdicts}["x"]


def test_constraints_name_the_figure_each_bundle_breaks():
    sel = select(candidates_from(RECORDS), Constraints(max_p95_ms=500, max_accuracy_drop=0.08))
    assert sel.pick == "dist/b"
    v = {x.name: x for x in sel.verdicts}
    assert v["dist/a"].broken == ("p95 e2e 900 ms > max 500",) and not v["dist/a"].feasible
    assert v["dist/c"].broken == ("accuracy drop 0.090 > max 0.08",)
    assert v["dist/a"].reason == "breaks p95 e2e 900 ms > max 500; also dominated by d"
    assert v["dist/b"].picked and v["dist/b"].on_front


def test_no_feasible_bundle_is_exit_3_naming_the_nearest_miss():
    with pytest.raises(GateFailed) as e:
        select(candidates_from(RECORDS), Constraints(min_accuracy=0.85, max_rss_mb=2000))
    # relative excess: a .059 + .5 (RSS), b .129, c .153, d .059 + .25 (RSS): b is nearest
    assert e.value.exit_code == 3
    assert "nearest miss: b (accuracy 0.740 < min 0.85)" in e.value.one_line()
    with pytest.raises(GateFailed, match="nearest miss: b .accuracy 0.740 < min 0.75"):
        select(candidates_from(RECORDS), Constraints(min_accuracy=0.75, max_rss_mb=1550))


def test_unknown_drop_and_latency_are_not_silently_feasible():
    records = [rec("r", 0.9, None, 1000, 100)]
    with pytest.raises(GateFailed, match="p95 latency unknown"):
        select(candidates_from(records), Constraints(max_p95_ms=100))
    with pytest.raises(GateFailed, match="accuracy drop unknown"):
        select(candidates_from(records), Constraints(max_accuracy_drop=0.1))


def test_bad_constraints_and_inputs():
    with pytest.raises(BadInput, match="--min-accuracy must be between 0 and 1"):
        Constraints(min_accuracy=80).check()
    with pytest.raises(BadInput, match="no eval results"):
        candidates_from([])
    with pytest.raises(BadInput, match="appears twice"):
        candidates_from([RECORDS[0], RECORDS[0]])


def test_select_from_eval_json_through_the_console_script(tmp_path):
    doc = tmp_path / "eval.json"
    doc.write_text(json.dumps({"tasks": "t@1", "bundles": RECORDS}))
    r = subprocess.run(
        [*EDGEKIT, "select", "--from", str(doc), "--max-p95-ms", "500", "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["selection"]
    assert out["pick"] == "dist/b" and set(out["front"]) == {"dist/b", "dist/d"}
    r = subprocess.run(
        [*EDGEKIT, "select", "--from", str(doc), "--min-accuracy", "0.95"], capture_output=True, text=True
    )
    assert r.returncode == 3 and r.stderr.strip().splitlines()[-1].startswith("error: no bundle meets the constraints")
    assert "dominated by" in r.stderr  # the table still says why each lost
    (tmp_path / "bad.json").write_text("{}")
    r = subprocess.run([*EDGEKIT, "select", "--from", str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "is not an `edgekit eval --json` document" in r.stderr
