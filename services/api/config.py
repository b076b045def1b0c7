from __future__ import annotations

import msgspec


class ApiConfig(msgspec.Struct, frozen=True):
    """api settings (env MESHSERVE_<FIELD>)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = ""  # Hugging Face folder; empty: the embedded default
    served_model_name: str = ""  # empty: derived from the model folder
    request_timeout_s: float = 600.0
    max_tokens_default: int = 16  # OpenAI's completions default
