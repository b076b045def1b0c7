from __future__ import annotations

import msgspec


class TtsConfig(msgspec.Struct, frozen=True):
    """tts settings (env MESHSERVE_<FIELD>)."""

    engines: int = 2  # engine processes per tts replica (espeak-ng: one synthesis each)
    max_queued_requests: int = 64  # beyond it: busy (HTTP 429)
