"""One entry of `edgekit build`, in its own interpreter (`python -m edgekit.buildchild JOB RESULT`):
reuse the previous output when its inputs are unchanged, else run the pipeline's whole flow.

A separate module from edgekit.build so that running it with -m never loads it twice (the
package imports edgekit.build through edgekit.api).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__, childjob
from .buildconfig import canonical
from .bundle import validate
from .checkpoint import resolve, sha256_file
from .errors import EdgekitError, ExitCode
from .exporting import recipe_for
from .formats import backend
from .parity import text_sha256
from .pipeline import BenchOptions, VerifyOptions, run_flow
from .progress import RichProgress
from .reference import load_eval_text
from .signals import install_sigterm
from .summary import BuildEntry
from .tasks import load_tasks
from .verification import thresholds_for


def run_job(spec: dict[str, Any]) -> BuildEntry:
    """The child's work for one entry (see build.run_job_child). Never raises for an entry
    failure: the failure becomes the entry's status, so the matrix goes on."""
    job = spec["job"]
    model = job["model"]
    out = Path(spec["out"])
    bundle = out / job["id"]
    tar_path = out / f"{job['id']}.tar.gz"
    t0 = time.monotonic()
    blank = BuildEntry(job["id"], model["name"], job["format"])
    try:
        progress = RichProgress(quiet=spec.get("quiet", False))
        ck = resolve(
            model["source"],
            revision=model["revision"],
            offline=spec["offline"],
            trust_remote_code=model["trust_remote_code"],
            allow_pickle=model["allow_pickle"],
        )
        recipe = recipe_for(job["format"], model["recipe"].get(job["format"]))
        thresholds = thresholds_for(job["format"], model["thresholds"].get(job["format"]))
        inputs = {
            "checkpoint_sha256": ck.provenance().get("content_sha256"),
            "format": job["format"],
            "recipe": _jsonable(recipe),
            "thresholds": _jsonable(thresholds),
            "tools": {"edgekit": __version__, **backend(job["format"]).tool_versions()},
            "eval_text_sha256": text_sha256(load_eval_text(spec["eval_text"])),
            "bench": {**spec["bench"], "profiles": job["profiles"], "budgets": job["budgets"]},
        }
        if spec.get("eval"):
            # the task file's hash, not its path, so an edited task file is never reused
            inputs["eval"] = {**spec["eval"], "tasks": None, "tasks_sha256": load_tasks(spec["eval"]["tasks"]).sha256}
        key = hashlib.sha256(canonical(inputs).encode()).hexdigest()
        prev = BuildEntry.from_dict(spec["previous"]) if spec.get("previous") else None
        if prev is not None and not spec["force"] and reusable(prev, key, bundle, tar_path):
            # Its own gates still hold; a previous --baseline comparison is redone by the caller.
            return dataclasses.replace(
                prev,
                reused=True,
                baseline=None,
                timings={"total_s": round(time.monotonic() - t0, 1)},
                built_timings=prev.built_timings or prev.timings,
            ).with_gates(g for g in prev.gates if g.kind != "regression")

        tar_path.unlink(missing_ok=True)  # never leave a tarball of an older bundle beside a new one
        flow = run_flow(
            ck,
            job["format"],
            recipe,
            bundle,
            force=True,
            progress=progress,
            offline=spec["offline"],
            verify_options=VerifyOptions(
                eval_text=spec["eval_text"], thresholds=model["thresholds"].get(job["format"]), offline=spec["offline"]
            ),
            bench_options=BenchOptions(profiles=tuple(job["profiles"]), budgets=job["budgets"], **spec["bench"]),
            eval_options=spec.get("eval"),
            manifest_sections={"build": {"input_key": key, "inputs": inputs, "config_sha256": spec["config_sha256"]}},
            tarball=tar_path,
        )
        timings = {**flow.timings, "total_s": round(time.monotonic() - t0, 1)}
        # A build always verifies and packs: the flow has a manifest and a parity report.
        assert flow.manifest is not None and flow.parity is not None
        return dataclasses.replace(
            blank,
            bundle=bundle.name,
            tarball=tar_path.name,
            tarball_sha256=flow.tarball_sha256,
            size_bytes=sum(f["size"] for f in flow.manifest["files"]),
            input_key=key,
            parity=flow.parity.summary(),
            bench=flow.bench,
            eval=flow.eval,
            timings=timings,
            reproducible_files=tuple(flow.manifest.get("reproducible_files", [])),
        ).with_gates(flow.gates)
    except EdgekitError as e:
        tar_path.unlink(missing_ok=True)
        return dataclasses.replace(
            blank,
            status="error",
            exit_code=e.exit_code,
            message=e.one_line(),
            timings={"total_s": round(time.monotonic() - t0, 1)},
        )
    except Exception as e:  # noqa: BLE001 - one entry's crash must not stop the matrix
        tar_path.unlink(missing_ok=True)
        first = str(e).splitlines()[0] if str(e) else ""
        return dataclasses.replace(
            blank,
            status="error",
            exit_code=ExitCode.ERROR,
            message=f"unexpected {type(e).__name__}: {first}",
            timings={"total_s": round(time.monotonic() - t0, 1)},
        )


def reusable(prev: BuildEntry | None, key: str, bundle: Path, tar_path: Path) -> bool:
    """Reuse only what is provably the same: same inputs, bundle intact, tarball unchanged."""
    if not prev or prev.input_key != key or prev.status not in ("ok", "gate_failed"):
        return False
    try:
        manifest = validate(bundle)
    except EdgekitError:
        return False
    if manifest.get("build", {}).get("input_key") != key or not tar_path.is_file():
        return False
    return sha256_file(tar_path) == prev.tarball_sha256


def _jsonable(obj: Any) -> Any:
    plain = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else obj
    return json.loads(json.dumps(plain, default=str))


def main(argv: list[str]) -> int:
    childjob.main(argv, lambda spec: run_job(spec).to_dict(), lambda spec: spec["job"]["id"])
    return ExitCode.OK


if __name__ == "__main__":
    install_sigterm()
    sys.exit(main(sys.argv[1:]))
