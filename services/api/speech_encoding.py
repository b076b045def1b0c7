"""Speech encoders driven from the event loop: the thin async shell over ``audio.py``
and ``audio_codec.py``.

Where encoding runs, and why here: mp3 and aac cost ~20 ms of CPU per second of
audio (opus ~15, flac ~5), which inline would stall every other stream and request
the api serves; so codec calls run in worker threads, at most
``ApiConfig.speech_encoder_threads`` at once (PyAV releases the GIL inside the codec,
so they do run in parallel). Not in the tts replica: the mesh carries PCM because
the api splices a failed-over request by sample offset, which an encoder's state
(bit reservoir, Ogg granules, priming) cannot survive. ``wav`` and ``pcm`` are only
framing and run inline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

from services.api.audio import (
    FORMATS,
    EncodingError,
    StreamEncoder,
    raw_stream,
    raw_whole_file,
)
from services.api.errors import ApiError
from shared.logs import get_logger

log = get_logger("meshserve.api.speech")

T = TypeVar("T")


def _encoder_failed(error: EncodingError) -> ApiError:
    return ApiError(500, f"audio encoding failed: {error}", code="encoder_error")


class EncodedStream:
    """One response's encoder: ``encode`` each PCM piece, ``finish`` once, ``close``
    always (also when the client left mid-way). An encoder failure is an ApiError."""

    def __init__(self, encoder: StreamEncoder, limiter: anyio.CapacityLimiter | None) -> None:
        self._encoder = encoder
        self._limiter = limiter  # None: cheap framing, run inline

    async def encode(self, pcm: bytes) -> bytes:
        return await self._run(self._encoder.encode, pcm)

    async def finish(self) -> bytes:
        return await self._run(self._encoder.finish)

    def close(self) -> None:
        try:
            self._encoder.close()
        except EncodingError as e:
            # The response is over either way (a file nobody will read): say so, go on.
            log.warning("speech encoder failed to close", error=str(e))

    async def _run(self, call: Callable[..., T], *args: object) -> T:
        try:
            if self._limiter is None:
                return call(*args)
            return await anyio.to_thread.run_sync(call, *args, limiter=self._limiter)
        except EncodingError as e:
            raise _encoder_failed(e) from e


class SpeechEncoding:
    """Makes the encoders of speech responses and bounds the threads they use."""

    def __init__(self, threads: int) -> None:
        self._limiter = anyio.CapacityLimiter(max(1, threads))

    def stream(self, response_format: str, sample_rate: int) -> EncodedStream:
        audio_format = FORMATS[response_format]
        if not audio_format.uses_codec:
            return EncodedStream(raw_stream(audio_format, sample_rate), None)
        from services.api.audio_codec import CodecStream  # PyAV loads ffmpeg: only when used

        try:
            return EncodedStream(CodecStream(audio_format, sample_rate), self._limiter)
        except EncodingError as e:
            raise _encoder_failed(e) from e

    async def whole_file(self, response_format: str, sample_rate: int, pcm: bytes) -> bytes:
        """A complete buffered body (exact sizes; see ``audio.py``)."""
        audio_format = FORMATS[response_format]
        if not audio_format.uses_codec:
            return raw_whole_file(audio_format, sample_rate, pcm)
        from services.api.audio_codec import codec_whole_file  # as in ``stream``

        try:
            return await anyio.to_thread.run_sync(
                codec_whole_file, audio_format, sample_rate, pcm, limiter=self._limiter)
        except EncodingError as e:
            raise _encoder_failed(e) from e
