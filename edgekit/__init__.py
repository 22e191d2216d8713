"""edgekit: export, verify and benchmark small language models for on-device runtimes.

Library first; the `edgekit` CLI is a thin client of these functions:

    import edgekit
    results = edgekit.export("smollm2-135m", target="gguf-q4_k_m", out="dist/smol-q4")
    edgekit.run("dist/smol-q4", "What is the capital of France?")
"""

__version__ = "0.1.0"

from .api import export, run, verify  # noqa: E402,F401
from .errors import EdgekitError  # noqa: E402,F401
