"""`edgekit run` and `edgekit validate`: generate from a bundle, check one against its manifest."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import validate as validate_dir
from .errors import BadInput
from .tarball import extract_safely
from .verification import open_bundle


@dataclass(frozen=True)
class RunResult:
    bundle: str
    format: str
    prompt: str
    text: str
    prompt_tokens: int
    generated_tokens: int
    stopped_by: str
    ttft_ms: float
    decode_tok_s: float
    token_ids: tuple[int, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run(
    bundle: str | Path,
    prompt: str,
    *,
    max_tokens: int = 128,
    raw: bool = False,
    system: str | None = None,
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> RunResult:
    """Generate greedily from a bundle. The prompt goes through the model's own chat template
    unless raw=True."""
    if max_tokens < 1:
        raise BadInput(f"--max-tokens must be at least 1, got {max_tokens}", "Pass a positive number")
    if not prompt:
        raise BadInput("the prompt is empty", "Pass --prompt TEXT")
    session, manifest = open_bundle(bundle, threads=threads)
    try:
        if raw:
            ids = session.encode(prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            ids = session.chat_prompt_ids(messages)
        first: list[float] = []
        t0 = time.perf_counter()

        def _on_text(piece: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if on_text:
                on_text(piece)

        gen = session.generate(ids, max_tokens, on_text=_on_text)
        t1 = time.perf_counter()
    finally:
        session.close()
    ttft = ((first[0] if first else t1) - t0) * 1000
    n = len(gen.token_ids)
    decode_s = t1 - (first[0] if first else t1)
    return RunResult(
        bundle=str(bundle),
        format=manifest["format"],
        prompt=prompt,
        text=gen.text,
        prompt_tokens=len(ids),
        generated_tokens=n,
        stopped_by=gen.stopped_by,
        ttft_ms=round(ttft, 1),
        decode_tok_s=round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else 0.0,
        token_ids=tuple(gen.token_ids),
    )


def validate(path: str | Path) -> dict[str, Any]:
    """Check a bundle directory or a bundle tarball (.tar.gz) against its manifest: schema,
    every file's size and sha256, nothing missing or extra. A tarball's members are checked
    (no absolute paths, `..`, links or devices) before anything is extracted, into a temp dir
    that is removed afterwards. Returns the manifest; raises IntegrityError (exit 4)."""
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tempfile.TemporaryDirectory(prefix="edgekit-validate-") as tmp:
            return validate_dir(extract_safely(path, Path(tmp) / "x"))
    if path.is_file():
        raise BadInput(f"{path} is neither a bundle directory nor a .tar.gz", "Pass a bundle directory or its tarball")
    return validate_dir(path)
