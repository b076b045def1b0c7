from __future__ import annotations

import msgspec


class TtsConfig(msgspec.Struct, frozen=True):
    """tts settings (env MESHSERVE_<FIELD>)."""

    engines: int = 2  # engine processes per tts replica (espeak-ng: one synthesis each)
    max_queued_requests: int = 64  # beyond it: busy (HTTP 429)
    engine: str = "espeak-ng"  # see services/tts/engines/base.py ENGINES
    max_chunk_chars: int = 300  # longest text chunk synthesized (and streamed) as one
    max_input_chars: int = 65536  # the api caps OpenAI clients at 4096 before this
    piece_ms: int = 1000  # audio per SpeechChunk while a chunk is still being synthesized
    cancel_grace_s: float = 2.0  # an engine that ignores a cancel this long is killed
    engine_start_timeout_s: float = 30.0
