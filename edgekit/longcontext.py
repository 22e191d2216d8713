"""The long-context probe: does a bundle still match the reference past the original context?

Models whose RoPE changes with the context (LongRoPE in Phi-3-mini-128k, Phi-3.5-mini and
Phi-4-mini; Llama 3's scaled rope; YaRN) behave differently once a sequence is longer than the
context they were pre-trained on. The short parity text never gets there, so a runtime that
handles the switch differently passes it and still fails users at token 4097.

The probe feeds a text that crosses the boundary the way an application does: a prompt that
ends a little before it, then one token at a time across it. Its reference is what
transformers computes for each prefix — the logits at position p are those of a forward pass
over ids[:p+1] — which is also what transformers' own generate() gives (Phi-3 drops its KV
cache at the switch and recomputes it with the long factors). Because attention is causal,
two forward passes give every position: one over ids[:boundary] (the short factors) for the
positions before the boundary, one over ids[:total-1] (the long factors) for those after.

What the pinned runtimes do at the boundary (measured on edgekit.tiny's phi3-longrope):
- onnxruntime-genai 0.15.2 switches to the long cos/sin cache for new tokens once the sequence
  passes the original context, but keeps the KV cache it computed with the short factors.
  It equals transformers run without the cache reset (KLD 5e-9) and differs from the
  reference past the boundary (KLD ~1.8). See RUNTIME_LIMITS.
- llama.cpp chooses the factors once per context: the long ones at every position when n_ctx
  exceeds the original context, the short ones otherwise. With n_ctx >= the text it matches
  the reference past the boundary, and the positions before it use the long factors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

# Positions the probe compares on each side of the boundary. 64 before: the switch must not
# disturb what came before; 256 after: enough to see a drift that grows with distance.
BEFORE = 64
AFTER = 256


def boundary_of(config: dict[str, Any]) -> int | None:
    """The context after which the model's RoPE changes, or None if it never does.

    A config with rope_scaling, or with max_position_embeddings above
    original_max_position_embeddings, has one: the original context (from the config or the
    rope_scaling table). Scaling without a recorded original context is static (linear,
    dynamic NTK at its own length), and is probed at max_position_embeddings / 2 capped at 4096.
    """
    cfg = config.get("text_config") or config
    scaling = cfg.get("rope_scaling") or {}
    original = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    longest = cfg.get("max_position_embeddings")
    if original and (scaling or (longest and longest > original)):
        return int(original)
    if scaling and longest:
        return min(int(longest) // 2, 4096)
    return None


def forced_boundary(config: dict[str, Any]) -> int | None:
    """Where --long-context probes a model without a boundary of its own: 4096 tokens, or
    half its context when that is shorter (the probe must fit in it)."""
    cfg = config.get("text_config") or config
    longest = cfg.get("max_position_embeddings")
    if not longest or longest < 2 * BEFORE + 8:
        return None
    return min(4096, int(longest) - AFTER - 1) if longest > 4096 + AFTER else int(longest) // 2


@dataclass(frozen=True)
class ProbePlan:
    boundary: int  # first position (0-based) whose logits use the long-context rope
    prompt_tokens: int  # prefilled at once; ends BEFORE tokens before the boundary
    total_tokens: int  # the whole probe text

    @classmethod
    def at(cls, boundary: int) -> ProbePlan:
        return cls(boundary=boundary, prompt_tokens=boundary - BEFORE, total_tokens=boundary + AFTER + 1)

    @property
    def positions(self) -> int:
        """Positions compared: prompt_tokens - 1 (the prefill's last) to total_tokens - 2."""
        return self.total_tokens - self.prompt_tokens


@dataclass(frozen=True)
class LongContextReport:
    boundary: int
    prompt_tokens: int
    total_tokens: int
    positions: int  # positions compared (those the bundle could run)
    positions_after: int  # of which past the boundary
    kld_mean: float
    top1_agreement: float
    kld_mean_before: float  # positions before the boundary
    kld_mean_after: float | None  # positions past it (None when the bundle stops before)
    top1_after: float | None
    parity_context: int  # tokens up to which the bundle matches the reference
    bundle_context: int | None  # the longest sequence the bundle accepts, if it has a limit
    limit: str | None  # the named runtime limit when parity stops early
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parity_context(kld: Sequence[float] | np.ndarray, first_position: int, threshold: float, block: int = 16) -> int:
    """Tokens from the start up to which the bundle matches the reference.

    Parity ends at the first compared position that is itself above `threshold` and starts a
    run of `block` positions whose mean is too: one noisy position of an int4 model does not
    end it, a drift does. The logits at position p are the model's view of p + 1 tokens, so
    parity holding through position p - 1 means sequences of up to p tokens."""
    import numpy as np

    k = np.asarray(kld, dtype=np.float64)
    for i in np.flatnonzero(k > threshold):
        if k[i : i + block].mean() > threshold:
            return first_position + int(i)
    return first_position + len(k)
