"""llama.cpp's log routed to Python, and GGUF metadata read through llama.cpp itself."""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ...errors import ToolFailed


class LlamaLog:
    """Routes llama.cpp's log to Python while quantizing: per-tensor lines drive the bar and
    fallback warnings become notes instead of pages of stderr. llama.cpp's logger is one
    global, so the previous callback (llama-cpp-python's) is put back afterwards."""

    def __init__(self) -> None:
        self.on_line: Callable[[str], None] = lambda line: None
        self.lines: deque[str] = deque(maxlen=60)
        self._buf = ""

    def __enter__(self) -> LlamaLog:
        import llama_cpp

        self._prev_cb, self._prev_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(self._prev_cb), ctypes.byref(self._prev_data))
        self._cb = llama_cpp.llama_log_callback(self._receive)  # must outlive the C call
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def _receive(self, level: int, text: bytes, user_data: object) -> None:
        try:
            self._buf += text.decode("utf-8", "replace")
            *done, self._buf = self._buf.split("\n")
            for line in done:
                if line.strip():
                    self.lines.append(line)
                    self.on_line(line)
        except Exception:  # noqa: BLE001 - an exception cannot cross the C callback
            pass

    def first_error(self) -> str:
        """The root cause: llama.cpp logs it first, then each caller up the stack adds a
        vaguer "failed to load model" line."""
        for line in self.lines:
            if any(word in line.lower() for word in ("error", "failed", "bad ", "invalid")):
                return line.strip()
        return self.lines[-1].strip() if self.lines else ""

    def __exit__(self, *exc: object) -> None:
        import llama_cpp

        llama_cpp.llama_log_set(self._prev_cb, self._prev_data)


def read_metadata(path: Path, keys: Sequence[str]) -> dict[str, str | None]:
    """GGUF metadata as llama.cpp itself reads it, plus "chat_template". "{arch}" in a key
    stands for general.architecture. Loads the vocabulary only (~0.2 s), where gguf's
    pure-Python reader walks every token string (seconds)."""
    import llama_cpp

    with LlamaLog() as log:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ToolFailed(
            f"llama.cpp could not read {path}: {log.first_error()}",
            "Re-export the bundle; check that llama-cpp-python is the version it was built with",
        )
    try:

        def value(key: str) -> str | None:
            size = 256
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
                if n < size:
                    break
                size = n + 1
            return buf.value.decode("utf-8", "replace") if n >= 0 else None

        arch = value("general.architecture") or ""
        out = {key: value(key.replace("{arch}", arch)) for key in keys}
        template = llama_cpp.llama_model_chat_template(model, None)
        out["chat_template"] = template.decode("utf-8") if template else None
        return out
    finally:
        llama_cpp.llama_model_free(model)
