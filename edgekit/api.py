"""The library API: one import for what the CLI does. It only re-exports; each job lives in
its own module (see docs/architecture.md):

    export    edgekit.pipeline       export -> verify (-> bench -> eval -> pack in a build)
    verify    edgekit.verification   parity against the unquantized checkpoint
    run       edgekit.runbundle      generate from a bundle (and from its reference); validate a bundle or tarball
    bench     edgekit.bench          speed and memory on a device profile
    evaluate  edgekit.evaluate       a task file on bundles and the reference
    select    edgekit.select         the Pareto set and the pick
    build     edgekit.build          a release matrix from an edgekit.toml
"""

from __future__ import annotations

from typing import Any

from .build import build, merge
from .evaluate import evaluate_bundles as evaluate
from .exporting import ALL, ExportResult, check_architecture, recipe_for
from .pipeline import export
from .runbundle import ReferenceRun, RunResult, run, run_reference, validate
from .select import select_bundles as select
from .tasks import load_tasks
from .verification import gate as parity_gate
from .verification import open_bundle, reference_checkpoints, thresholds_for, verify

__all__ = [
    "ALL",
    "ExportResult",
    "ReferenceRun",
    "RunResult",
    "bench",
    "build",
    "check_architecture",
    "evaluate",
    "export",
    "load_tasks",
    "merge",
    "open_bundle",
    "parity_gate",
    "recipe_for",
    "reference_checkpoints",
    "run",
    "run_reference",
    "select",
    "thresholds_for",
    "validate",
    "verify",
]


def bench(*args: Any, **kwargs: Any) -> Any:
    """Prefill and decode tokens/sec, time to first token, peak RSS and bandwidth utilization of
    each bundle (default: every bundle under dist/) on a device profile; see edgekit.bench.bench.

    A wrapper, not a re-export, only because edgekit.bench is also the benchmark child's
    __main__: imported by the package it would load twice in that child."""
    from .bench import bench as run_bench

    return run_bench(*args, **kwargs)
