"""``POST /v1/audio/speech`` and ``GET /v1/audio/voices``, over the ``SpeechGateway``.

They use the text routes' layers: bodies through ``body.read_json`` (bounded by
``ApiConfig.speech_max_request_bytes``), ``ApiError`` for every failure (rendered by
the app's handler before the first byte), a ``SpeechSpan`` (a ``ServerSpan``),
``StreamingBody`` for streamed answers and ``cancelled_on_disconnect`` for buffered
ones.

HTTP behaviour, as OpenAI's: every ``response_format`` (mp3 when absent, opus, aac,
flac, wav, pcm; ``audio.py`` says how each is streamed), the body streams as it is
synthesized (chunked) and encoded (``speech_encoding.py``: codecs in worker threads);
WAV with 0xFFFFFFFF RIFF/data sizes since the length is not known yet; ``pcm`` is raw
s16le mono at ``sample_rate`` (24 kHz by default, as OpenAI's). ``stream_format``
``sse`` sends ``speech.audio.delta`` events (base64 of the same bytes) and a final
``speech.audio.done``. Extensions: ``"stream": false`` buffers the whole response
(exact WAV sizes, MP3 LAME tag, FLAC STREAMINFO; Content-Length), ``sample_rate``
picks 8000..48000 Hz (mp3, opus and aac: the rates their codec takes). Errors before
the first byte are OpenAI error bodies (400 bad input, 404 unknown model, 429 busy,
503 no replica, 504 timeout); a failure mid-stream aborts the connection (audio) or
ends with an ``error`` event (sse), so a client never mistakes a cut-off file for a
whole one.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.api.audio import FORMATS
from services.api.body import read_json
from services.api.config import ApiConfig
from services.api.disconnect import cancelled_on_disconnect
from services.api.errors import ApiError
from services.api.openai_schema import (
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechBody,
    SpeechStreamError,
    SpeechUsage,
    VoiceCard,
    VoiceList,
)
from services.api.render import sse_event
from services.api.responses import (
    SSE_MEDIA_TYPE,
    StreamingBody,
    client_gone_response,
    json_response,
)
from services.api.spans import SpeechSpan, context_from_headers
from services.api.speech_encoding import SpeechEncoding
from services.api.speech_flight import SpeechFlight
from services.api.speech_gateway import SpeechGateway
from services.api.speech_plan import check_speech_body, plan_speech
from shared.logs import get_logger

log = get_logger("meshserve.api.speech")


class SpeechRoutes:
    """Handlers of ``/v1/audio/speech`` and ``/v1/audio/voices``."""

    def __init__(self, gateway: SpeechGateway, config: ApiConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.encoding = SpeechEncoding(config.speech_encoder_threads)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/audio/speech", self.speech, methods=["POST"]),
            Route("/v1/audio/voices", self.voices, methods=["GET"]),
        ]

    async def voices(self, request: Request) -> Response:
        return json_response(VoiceList(data=[
            VoiceCard(id=v.name, name=v.name, language=v.language, gender=v.gender or None,
                      description=v.description)
            for v in self.gateway.voices()
        ]))

    async def speech(self, request: Request) -> Response:
        body = check_speech_body(
            await read_json(request, SpeechBody, self.config.speech_max_request_bytes,
                            self.config.body_timeout_s)
        )
        span = SpeechSpan(body, context_from_headers(request.headers), request.url.path)
        flight: SpeechFlight | None = None
        try:
            flight = await self.gateway.open(plan_speech(body), span.context)
            # Headers wait for the first audio (or the error), so a request that fails
            # early gets a proper status instead of a 200 with a broken body.
            first = await self._next(flight)
        except BaseException as error:
            with anyio.CancelScope(shield=True):
                if flight is not None:
                    await self.gateway.close(flight)
            if isinstance(error, ApiError):
                log.info("speech request failed", status=error.status, code=error.code,
                         message=error.message)
                span.fail(error)
            span.end()
            raise
        if body.stream_format == "sse":
            return self._stream_sse(body, flight, first, span)
        if body.stream:
            return self._stream_audio(body, flight, first, span)
        return await self._whole(request, body, flight, first, span)

    async def _next(self, flight: SpeechFlight) -> bytes | None:
        """The flight's next audio; 504 when the mesh sends none in time."""
        timeout = self.config.request_timeout_s
        with anyio.move_on_after(timeout) as waited:
            return await flight.next()
        if waited.cancelled_caught:
            raise ApiError(504, f"no audio from the mesh in {timeout:g} s", code="timeout")
        return None

    async def _audio(
        self, flight: SpeechFlight, first: bytes | None, span: SpeechSpan
    ) -> AsyncIterator[bytes]:
        """The flight's PCM from ``first`` on; its failure is recorded, then raised."""
        if first:
            yield first
        try:
            while (pcm := await self._next(flight)) is not None:
                yield pcm
        except ApiError as error:
            span.fail(error)
            raise

    async def _encoded(
        self, body: SpeechBody, flight: SpeechFlight, first: bytes | None, span: SpeechSpan
    ) -> AsyncIterator[bytes]:
        """The flight's audio in the body's format, as the encoder makes it; a failure
        (the mesh's or the encoder's) is recorded, then raised."""
        encoder = self.encoding.stream(body.response_format, flight.sample_rate)
        try:
            async for pcm in self._audio(flight, first, span):
                if data := await encoder.encode(pcm):
                    yield data
            if data := await encoder.finish():
                yield data
        except ApiError as error:
            if error.code == "encoder_error":  # the mesh's failures are recorded already
                span.fail(error)
            raise
        finally:
            encoder.close()

    def _closer(self, flight: SpeechFlight, span: SpeechSpan) -> Callable[[bool], Awaitable[None]]:
        async def close(disconnected: bool) -> None:
            if disconnected and not flight.ended:
                log.info("speech client disconnected", request_id=flight.request_id)
                span.client_gone()
            # A request still running is cancelled at its replica.
            await self.gateway.close(flight)
            self._end_span(span, flight)

        return close

    @staticmethod
    def _end_span(span: SpeechSpan, flight: SpeechFlight) -> None:
        span.audio(flight)
        if flight.done:
            span.succeed()
        span.end()

    def _stream_audio(
        self, body: SpeechBody, flight: SpeechFlight, first: bytes | None, span: SpeechSpan
    ) -> Response:
        # An ApiError out of the chunks reaches StreamingBody, which aborts the
        # connection: the client sees a broken transfer, not a complete-looking short file.
        return StreamingBody(self._encoded(body, flight, first, span),
                             self._closer(flight, span),
                             media_type=FORMATS[body.response_format].media_type,
                             headers=self._headers(flight))

    def _stream_sse(
        self, body: SpeechBody, flight: SpeechFlight, first: bytes | None, span: SpeechSpan
    ) -> Response:
        async def events() -> AsyncIterator[bytes]:
            try:
                async for data in self._encoded(body, flight, first, span):
                    audio = base64.b64encode(data).decode()
                    yield sse_event(SpeechAudioDelta("speech.audio.delta", audio))
            except ApiError as error:
                yield sse_event(SpeechStreamError("error", error.body().error))
                return
            # No tokens in espeak-ng: usage counts input characters.
            chars = len(body.input)
            yield sse_event(SpeechAudioDone("speech.audio.done", SpeechUsage(chars, 0, chars)))

        return StreamingBody(events(), self._closer(flight, span), media_type=SSE_MEDIA_TYPE,
                             headers=self._headers(flight))

    async def _whole(
        self, request: Request, body: SpeechBody, flight: SpeechFlight, first: bytes | None,
        span: SpeechSpan,
    ) -> Response:
        pieces: list[bytes] = []
        failure: ApiError | None = None
        try:
            async with cancelled_on_disconnect(request.receive) as watch:
                try:
                    async for pcm in self._audio(flight, first, span):
                        pieces.append(pcm)
                except ApiError as error:
                    failure = error
        finally:
            with anyio.CancelScope(shield=True):
                await self.gateway.close(flight)
        if watch.disconnected:
            span.client_gone()
            self._end_span(span, flight)
            return client_gone_response()
        if failure is None:
            try:
                content = await self.encoding.whole_file(body.response_format,
                                                         flight.sample_rate, b"".join(pieces))
            except ApiError as error:
                span.fail(error)
                failure = error
        if failure is not None:
            span.audio(flight)
            span.end()
            raise failure
        self._end_span(span, flight)
        return Response(content, media_type=FORMATS[body.response_format].media_type,
                        headers=self._headers(flight))

    @staticmethod
    def _headers(flight: SpeechFlight) -> dict[str, str]:
        return {"x-request-id": flight.request_id, "x-sample-rate": str(flight.sample_rate)}


def speech_routes(gateway: SpeechGateway, config: ApiConfig) -> list[BaseRoute]:
    """The speech routes, to mount beside the text routes."""
    return SpeechRoutes(gateway, config).routes()
