from __future__ import annotations

import msgspec


class TokenizerConfig(msgspec.Struct, frozen=True):
    """tokenizer settings (env MESHSERVE_<FIELD>)."""

    model: str = ""  # Hugging Face folder; empty: the embedded default
    max_inflight: int = 4096  # requests this replica detokenizes at once
