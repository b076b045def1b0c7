"""One speech request between the gateway (which feeds it from tts replicas) and its
HTTP handler (which reads it): the counterpart of ``requests.Flight`` for audio."""

from __future__ import annotations

import time
from collections import deque

import anyio
from opentelemetry.context import Context

from services.api.errors import ApiError
from shared.protocol.speech import SpeechChunk, SpeechRequest


class SpeechFlight:
    """One request's audio on its way to the client: deduplicated by sample offset,
    buffered (up to ``max_buffered_bytes``) while the client reads slower than
    synthesis runs."""

    def __init__(self, request: SpeechRequest, context: Context, max_buffered_bytes: int) -> None:
        self.request = request
        self.context = context
        self.replica: bytes | None = None
        self.tried: set[bytes] = set()
        self.sample_rate = request.sample_rate
        self.samples = 0  # accepted from the mesh (the client's position, once read)
        self.started = time.monotonic()
        self.first_audio_s: float | None = None
        self.done = False
        self.error: ApiError | None = None
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._max_buffered = max_buffered_bytes
        self._changed = anyio.Event()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def ended(self) -> bool:
        return self.done or self.error is not None

    @property
    def audio_s(self) -> float:
        """Seconds of audio accepted so far."""
        return self.samples / self.sample_rate if self.sample_rate else 0.0

    def accept(self, chunk: SpeechChunk) -> None:
        """Take a chunk's new samples; what the client already has is skipped."""
        if self.ended:
            return
        self.sample_rate = chunk.sample_rate
        skip = self.samples - chunk.sample_offset
        pcm = chunk.pcm[2 * skip:] if skip > 0 else chunk.pcm
        if pcm:
            if self.first_audio_s is None:
                self.first_audio_s = time.monotonic() - self.started
            self.samples += len(pcm) // 2
            self._pending.append(pcm)
            self._pending_bytes += len(pcm)
            if self._pending_bytes > self._max_buffered:
                self.fail(ApiError(
                    503, f"the client reads audio too slowly ({self._pending_bytes} bytes "
                    "waiting); request stopped", code="client_too_slow",
                ))
                return
        if chunk.final:
            self.done = True
        self._changed.set()

    def fail(self, error: ApiError) -> None:
        if not self.ended:
            self.error = error
            self._pending.clear()
            self._changed.set()

    async def next(self) -> bytes | None:
        """The next audio bytes, None at the end; raises the request's ApiError."""
        while True:
            if self._pending:
                pcm = self._pending.popleft()
                self._pending_bytes -= len(pcm)
                return pcm
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            self._changed = anyio.Event()
            await self._changed.wait()
