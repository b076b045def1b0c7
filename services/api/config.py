from __future__ import annotations

from typing import Annotated

import msgspec

from shared.protocol.generation import MAX_CHOICES


class ApiConfig(msgspec.Struct, frozen=True):
    """api settings (env MESHSERVE_<FIELD>)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = ""  # Hugging Face folder; empty: the embedded default
    served_model_name: str = ""  # empty: derived from the model folder
    request_timeout_s: float = 600.0  # no news from the mesh this long: abort, HTTP 504
    max_tokens_default: int = 16  # OpenAI's completions default
    # Chat without max_tokens generates until the context limit, as vLLM does: the
    # cap is far above any context length, and the scheduler finishes the request
    # with "length" at max_model_len.
    chat_max_tokens_default: int = 1 << 20
    # largest `n` (choices per request) accepted; the wire carries at most MAX_CHOICES
    max_n: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)] = 16
    max_inflight: int = 4096  # in-flight sub-requests; beyond it HTTP 429
    # SIGTERM drains: new requests get 503, in-flight ones get this long to finish
    # (`meshserve up --shutdown-timeout`; the supervisor reads the same setting).
    shutdown_timeout_s: float = 30.0
    # After the drain deadline: what is left is failed and aborted, and open HTTP
    # connections get this long to take their error before the process ends.
    shutdown_grace_s: float = 5.0
    max_request_bytes: int = 16 << 20  # larger request bodies get HTTP 413
    # Slow clients: a request's line and headers must arrive within header_timeout_s
    # (of the connection or of its first byte), its body within body_timeout_s (else
    # HTTP 408); an idle keep-alive connection is closed after keep_alive_timeout_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    max_header_bytes: int = 16 << 10  # request line + headers; larger: HTTP 400
    # Bearer keys the HTTP API requires (comma-separated; `meshserve up --api-key`).
    # Empty: open. /health, /health/*, /metrics and /openapi.json stay open always.
    api_key: str = ""
    # Speech. What a request may ask for (input length, speed, sample rate) is in
    # shared/protocol/speech.py, shared with the tts replicas; these bound the api.
    speech_max_request_bytes: int = 1 << 20  # a 4096-character input is far below this
    speech_max_inflight: int = 1024  # speech requests in flight; beyond it HTTP 429
    speech_max_buffered_bytes: int = 64 << 20  # audio one slow client may leave unread
    speech_max_attempts: int = 3  # replicas one request may be sent to (busy, lost)
    # Threads that run the mp3/opus/aac/flac encoders (~20 ms of CPU per second of
    # audio), so the event loop never waits on a codec; wav and pcm need none.
    speech_encoder_threads: int = 4
