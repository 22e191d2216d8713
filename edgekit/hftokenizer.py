"""transformers' tokenizer for a local checkpoint, loaded the one way edgekit loads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# transformers 4.57.3 up to 5.0 warns "... incorrect regex pattern ... This will lead to incorrect
# tokenization" for every local fast tokenizer of more than 100000 tokens (Gemma 3, Llama 3,
# Phi-4-mini, Qwen2.5) whose config.json one of those versions saved, whatever the model: its
# check reads the version before the model type. The regex it means
# is Mistral's; for these model types we leave transformers its warning and its patch.
MISTRAL_REGEX_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """transformers' AutoTokenizer for a local checkpoint, without the false Mistral warning."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    config = Path(path) / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        if model_type not in MISTRAL_REGEX_TYPES:
            kwargs["fix_mistral_regex"] = False  # answered: no patch, no warning
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
