"""Speech on the api: ``POST /v1/audio/speech`` and ``GET /v1/audio/voices``, over tts
replicas reached through a ``SpeechGateway``.

    HTTP handler ──open()──▶ SpeechRequest ──▶ tts replica (least outstanding per engine)
    HTTP handler ◀── SpeechFlight.next() ◀── SpeechChunk / SpeechFailed ◀── tts replicas
    HTTP handler ──close()──▶ SpeechCancel (client gone, error, timeout) ──▶ its replica

The gateway binds a ROUTER at ``MESHSERVE_SPEECH_ADDR``; tts replicas connect and send
their ``SpeechCatalog`` (voices, models) once their engines are up. A replica that
answers busy gets the request re-routed to the least loaded replica not yet tried;
a replica that is lost has its requests re-sent elsewhere, and the audio the client
already has is skipped by ``sample_offset``, so nothing repeats. With no replica left,
the request fails with 503.

Wiring into the api service (two lines and a metrics hook)::

    gateway = SpeechGateway(runtime.zmq, runtime.addresses.speech_addr, runtime.identity,
                            heartbeat_s=runtime.process.heartbeat_s)
    await tg.start(gateway.run)
    app = build_app(..., extra_routes=speech_routes(gateway,
                                                    request_timeout_s=config.request_timeout_s))
    # /metrics: append gateway.metrics.render() (or gateway.metrics_text())

HTTP behaviour, as OpenAI's: the body streams as it is synthesized (chunked), WAV
with 0xFFFFFFFF RIFF/data sizes since the length is not known yet; ``pcm`` is raw
s16le mono at ``sample_rate`` (24 kHz by default, as OpenAI's). ``stream_format``
``sse`` sends ``speech.audio.delta`` events (base64 of the same bytes) and a final
``speech.audio.done``. Extensions: ``"stream": false`` buffers the whole response
(exact WAV sizes, Content-Length), ``sample_rate`` picks 8000..48000 Hz. The default
``response_format`` is ``wav`` (OpenAI's default, mp3, needs an encoder meshserve
does not ship); mp3/opus/aac/flac are a 400 that says so. Errors before the first
byte are OpenAI error bodies (400 bad input, 404 unknown model, 429 busy, 503 no
replica, 504 timeout); a failure mid-stream aborts the connection (audio) or ends
with an ``error`` event (sse), so a client never mistakes a cut-off file for a
whole one.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import msgspec
import zmq.asyncio
from anyio.abc import TaskStatus
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from services.api.metrics import Histogram
from shared.logs import get_logger
from shared.mesh import Identity, Peer, PeerJoined, PeerLost, Received, RouterEndpoint
from shared.protocol.speech import (
    SpeechCancel,
    SpeechCatalog,
    SpeechCatalogRequest,
    SpeechChunk,
    SpeechFailed,
    SpeechFromTts,
    SpeechRequest,
    SpeechStatus,
    SpeechStatusRequest,
    SpeechVoice,
)
from shared.telemetry import tracer

log = get_logger("meshserve.api.speech")
_tracer = tracer("meshserve.api")
_propagator = TraceContextTextMapPropagator()

TTS = "tts"
MAX_INPUT_CHARS = 4096  # OpenAI's limit
MAX_BODY_BYTES = 1 << 20  # a 4096-character input in JSON is far below this
DEFAULT_SAMPLE_RATE = 24000  # what OpenAI clients expect from `pcm`
MIN_SPEED, MAX_SPEED = 0.25, 4.0
RESPONSE_FORMATS = ("wav", "pcm")
UNSUPPORTED_FORMATS = ("mp3", "opus", "aac", "flac")
MAX_ATTEMPTS = 3  # replicas a request may be sent to (busy answers, lost replicas)


class SpeechError(Exception):
    """A speech request ends with this HTTP status and OpenAI error body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> bytes:
        kind = {404: "not_found_error", 429: "rate_limit_error", 504: "timeout_error"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return msgspec.json.encode(
            {"error": {"message": self.message, "type": kind, "param": self.param,
                       "code": self.code}}
        )

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, media_type="application/json")


def _bad(message: str, param: str | None) -> SpeechError:
    return SpeechError(400, message, "invalid_request_error", param)


# ------------------------------------------------------------------ audio formats


def wav_header(sample_rate: int, num_samples: int | None) -> bytes:
    """A 44-byte PCM s16le mono WAV header; ``num_samples`` None: length unknown
    (streaming), written as 0xFFFFFFFF as OpenAI's streamed WAV files are."""
    if num_samples is None:
        data_size = riff_size = 0xFFFFFFFF
    else:
        data_size = num_samples * 2
        riff_size = min(36 + data_size, 0xFFFFFFFF)
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", riff_size, b"WAVE",
        b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16,
        b"data", min(data_size, 0xFFFFFFFF),
    )


MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm"}


# ------------------------------------------------------------------- the gateway


@dataclass(slots=True)
class TtsReplica:
    peer: Peer
    catalog: SpeechCatalog | None = None
    status: SpeechStatus | None = None
    requests: set[str] = field(default_factory=set)

    @property
    def ready(self) -> bool:
        return self.catalog is not None and self.peer.hello.ready

    @property
    def load(self) -> float:
        return len(self.requests) / max(1, self.peer.hello.capacity)


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
        self.error: SpeechError | None = None
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
                self.fail(SpeechError(
                    503, f"the client reads audio too slowly ({self._pending_bytes} bytes "
                    "waiting); request stopped", "client_too_slow",
                ))
                return
        if chunk.final:
            self.done = True
        self._changed.set()

    def fail(self, error: SpeechError) -> None:
        if not self.ended:
            self.error = error
            self._pending.clear()
            self._changed.set()

    async def next(self) -> bytes | None:
        """The next audio bytes, None at the end; raises the request's SpeechError."""
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


def _histogram(histogram: Histogram, name: str) -> list[str]:
    return [f"# TYPE {name} histogram", *histogram.lines(name, "")]


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RTF = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class SpeechMetrics:
    """Prometheus metrics of the speech path, rendered as text exposition lines for
    the api's /metrics (``meshserve:speech_*``; vLLM has no speech metrics to match)."""

    PREFIX = "meshserve:speech_"

    def __init__(
        self, replica_status: Callable[[], dict[str, SpeechStatus]] | None = None
    ) -> None:
        self.replica_status = replica_status  # each tts replica's last SpeechStatus
        self.requests: dict[str, int] = {}  # by outcome: ok | error | cancelled
        self.audio_seconds = 0.0
        self.input_chars = 0
        self.running = 0
        self.ready_replicas = 0
        self.time_to_first_audio = Histogram(_SECONDS)
        self.request_duration = Histogram(_SECONDS)
        self.real_time_factor = Histogram(_RTF)  # wall time / audio time, finished requests

    def finished(self, flight: SpeechFlight, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1
        self.input_chars += len(flight.request.input)
        elapsed = time.monotonic() - flight.started
        audio = flight.samples / flight.sample_rate if flight.sample_rate else 0.0
        self.audio_seconds += audio
        if flight.first_audio_s is not None:
            self.time_to_first_audio.observe(flight.first_audio_s)
        if outcome == "ok":
            self.request_duration.observe(elapsed)
            if audio > 0:
                self.real_time_factor.observe(elapsed / audio)

    def render(self) -> str:
        """Exposition text, with each tts replica's last status."""
        p = self.PREFIX
        lines = [f"# TYPE {p}requests_total counter"]
        lines += [
            f'{p}requests_total{{outcome="{outcome}"}} {count}'
            for outcome, count in sorted(self.requests.items())
        ]
        lines += [
            f"# TYPE {p}audio_seconds_total counter",
            f"{p}audio_seconds_total {self.audio_seconds}",
            f"# TYPE {p}input_characters_total counter",
            f"{p}input_characters_total {self.input_chars}",
            f"# TYPE {p}requests_running gauge",
            f"{p}requests_running {self.running}",
            f"# TYPE {p}replicas_ready gauge",
            f"{p}replicas_ready {self.ready_replicas}",
            *_histogram(self.time_to_first_audio, f"{p}time_to_first_audio_seconds"),
            *_histogram(self.request_duration, f"{p}request_duration_seconds"),
            *_histogram(self.real_time_factor, f"{p}real_time_factor"),
        ]
        gauges = ("engines", "engines_ready", "engines_busy", "requests", "queued_chunks",
                  "running_chunks")
        counters = ("completed", "cancelled", "cancelled_running", "busy_rejections",
                    "engine_restarts")
        statuses = sorted(self.replica_status().items()) if self.replica_status else []
        for name in gauges + counters:
            metric = f"{p}tts_{name}" + ("_total" if name in counters else "")
            lines.append(f"# TYPE {metric} {'counter' if name in counters else 'gauge'}")
            lines += [f'{metric}{{replica="{r}"}} {getattr(st, name)}' for r, st in statuses]
        return "\n".join(lines) + "\n"


class SpeechGateway:
    """The api's side of the speech socket: tts replicas and in-flight requests."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        identity: Identity,
        *,
        heartbeat_s: float,
        max_inflight: int = 1024,
        max_buffered_bytes: int = 64 << 20,
        status_interval_s: float = 1.0,
    ) -> None:
        self.router: RouterEndpoint[SpeechFromTts] = RouterEndpoint(
            ctx, address, identity, SpeechFromTts, heartbeat_s=heartbeat_s
        )
        self.replicas: dict[bytes, TtsReplica] = {}
        self.flights: dict[str, SpeechFlight] = {}
        self.max_inflight = max_inflight
        self.max_buffered_bytes = max_buffered_bytes
        self.metrics = SpeechMetrics(self._replica_statuses)
        self.status_interval_s = status_interval_s
        self._replicas_changed = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started, then serve the replicas until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.router.run)
                tg.start_soon(self._serve)
                tg.start_soon(self._poll_status)
                log.info("speech gateway up", speech_addr=self.router.address)
                task_status.started()
        finally:
            for flight in list(self.flights.values()):
                flight.fail(SpeechError(503, "the api is shutting down", "shutting_down"))

    # --- catalog ---------------------------------------------------------------------

    def ready_replicas(self) -> list[TtsReplica]:
        return [r for r in self.replicas.values() if r.ready]

    async def wait_for_replicas(self, count: int = 1) -> None:
        """Until at least ``count`` replicas are ready (for readiness and tests)."""
        while len(self.ready_replicas()) < count:
            await self._replicas_changed.wait()

    def voices(self) -> list[SpeechVoice]:
        seen: dict[str, SpeechVoice] = {}
        for replica in self.ready_replicas():
            assert replica.catalog is not None
            for voice in replica.catalog.voices:
                seen.setdefault(voice.name, voice)
        return list(seen.values())

    def _serves(self, replica: TtsReplica, request: SpeechRequest) -> bool:
        catalog = replica.catalog
        return (
            catalog is not None
            and any(v.name == request.voice for v in catalog.voices)
            and (not request.model or request.model in catalog.models)
        )

    def check(self, request: SpeechRequest) -> None:
        """Raise the SpeechError a request would get from every ready replica."""
        replicas = self.ready_replicas()
        if not replicas:
            raise SpeechError(503, "no text-to-speech replica is ready", "service_unavailable")
        catalogs = [r.catalog for r in replicas if r.catalog is not None]
        if request.model and not any(request.model in c.models for c in catalogs):
            known = sorted({m for c in catalogs for m in c.models})
            raise SpeechError(404, f"The model `{request.model}` does not exist; speech models: "
                              f"{', '.join(known)}", "model_not_found", "model")
        if not any(self._serves(r, request) for r in replicas):
            raise _bad(f"unknown voice {request.voice!r}; GET /v1/audio/voices lists them",
                       "voice")

    # --- flights ---------------------------------------------------------------------

    def _pick(self, flight: SpeechFlight) -> TtsReplica | None:
        candidates = [
            r for r in self.ready_replicas()
            if r.peer.identity not in flight.tried and self._serves(r, flight.request)
        ]
        return min(candidates, key=lambda r: (r.load, len(r.requests), r.peer.name), default=None)

    async def open(self, request: SpeechRequest, context: Context) -> SpeechFlight:
        """Send ``request`` to the least loaded replica that can serve it."""
        self.check(request)
        if len(self.flights) >= self.max_inflight:
            raise SpeechError(429, f"{self.max_inflight} speech requests are in flight",
                              "server_busy")
        if request.request_id in self.flights:
            raise _bad(f"request id {request.request_id!r} is in use", None)
        flight = SpeechFlight(request, context, self.max_buffered_bytes)
        self.flights[request.request_id] = flight
        self.metrics.running += 1
        await self._route(flight, "new")
        return flight

    async def _route(self, flight: SpeechFlight, why: str) -> None:
        """Send the flight to a replica it has not tried, or fail it."""
        while not flight.ended:
            replica = self._pick(flight) if len(flight.tried) < MAX_ATTEMPTS else None
            if replica is None:
                if why == "busy":
                    error = SpeechError(429, "every text-to-speech replica is busy",
                                        "server_busy")
                else:
                    error = SpeechError(503, "no text-to-speech replica could take the "
                                        f"request ({why})", "service_unavailable")
                self._end(flight, error)
                return
            flight.tried.add(replica.peer.identity)
            flight.replica = replica.peer.identity
            replica.requests.add(flight.request_id)
            if await self.router.send(replica.peer, flight.request, flight.context):
                if why != "new":
                    log.info("speech request re-routed", request_id=flight.request_id,
                             replica=replica.peer.name, why=why)
                return
            replica.requests.discard(flight.request_id)  # gone: PeerLost follows

    async def close(self, flight: SpeechFlight) -> None:
        """The handler is done with ``flight`` (finished, failed or abandoned);
        a request still running is cancelled at its replica. Idempotent."""
        if self.flights.pop(flight.request_id, None) is None:
            return
        self.metrics.running -= 1
        replica = self.replicas.get(flight.replica) if flight.replica else None
        if replica is not None:
            replica.requests.discard(flight.request_id)
        if not flight.ended:
            flight.fail(SpeechError(499, "client closed the request", "cancelled"))
            self.metrics.finished(flight, "cancelled")
            if replica is not None:
                await self.router.send(replica.peer, SpeechCancel([flight.request_id]),
                                       flight.context)
        else:
            self.metrics.finished(flight, "ok" if flight.error is None else "error")

    def _end(self, flight: SpeechFlight, error: SpeechError | None = None) -> None:
        """The mesh is done with the flight (the handler still reads what is left)."""
        replica = self.replicas.get(flight.replica) if flight.replica else None
        if replica is not None:
            replica.requests.discard(flight.request_id)
        if error is not None:
            flight.fail(error)

    def _replica_statuses(self) -> dict[str, SpeechStatus]:
        return {r.peer.name: r.status for r in self.replicas.values() if r.status}

    def metrics_text(self) -> str:
        """The speech part of the api's /metrics (same as ``metrics.render()``)."""
        return self.metrics.render()

    # --- the socket ------------------------------------------------------------------

    async def _poll_status(self) -> None:
        """Ask every replica for its status now and then (for /metrics); answers
        arrive on the inbox like anything else."""
        while True:
            for replica in list(self.replicas.values()):
                await self.router.send(replica.peer, SpeechStatusRequest())
            await anyio.sleep(self.status_interval_s)

    async def _serve(self) -> None:
        async for event in self.router.inbox:
            match event:
                case PeerJoined(peer=peer) if peer.hello.service == TTS:
                    self.replicas[peer.identity] = TtsReplica(peer)
                    log.info("tts replica joined", replica=peer.name,
                             capacity=peer.hello.capacity)
                    # A replica we reaped and that comes back never saw us go, so it
                    # would not announce itself again: ask.
                    await self.router.send(peer, SpeechCatalogRequest())
                case PeerJoined(peer=peer):
                    log.warning("unexpected service on the speech socket", peer=peer.name)
                case PeerLost(peer=peer, reason=reason):
                    await self._replica_lost(peer, reason)
                case Received(peer=Peer() as peer, body=body):
                    await self._on_message(peer, body)
            ready = len(self.ready_replicas())
            if ready != self.metrics.ready_replicas:
                self.metrics.ready_replicas = ready
                self._replicas_changed.set()
                self._replicas_changed = anyio.Event()

    async def _replica_lost(self, peer: Peer, reason: str) -> None:
        replica = self.replicas.pop(peer.identity, None)
        if replica is None:
            return
        log.warning("tts replica lost", replica=peer.name, reason=reason,
                    requests=len(replica.requests))
        for request_id in sorted(replica.requests):
            flight = self.flights.get(request_id)
            if flight is not None and not flight.ended:
                await self._route(flight, f"replica {peer.name} lost: {reason}")

    async def _on_message(self, peer: Peer, body: SpeechFromTts) -> None:
        replica = self.replicas.get(peer.identity)
        if replica is None:
            return
        match body:
            case SpeechCatalog():
                first = replica.catalog is None
                replica.catalog = body
                if first:
                    log.info("tts replica ready", replica=peer.name, engine=body.engine,
                             voices=len(body.voices))
            case SpeechStatus():
                replica.status = body
            case SpeechChunk() | SpeechFailed():
                flight = self.flights.get(body.request_id)
                if flight is None or flight.replica != peer.identity or flight.ended:
                    # A request this replica should not be working on (finished,
                    # cancelled, or re-routed away): tell it to stop.
                    if isinstance(body, SpeechChunk) and not body.final:
                        log.debug("stray speech chunk", replica=peer.name,
                                  request_id=body.request_id)
                        await self.router.send(peer, SpeechCancel([body.request_id],
                                                                  reason="unknown request"))
                    return
                if isinstance(body, SpeechChunk):
                    flight.accept(body)
                    if body.final:
                        self._end(flight)
                elif body.status == 429 and body.code == "server_busy":
                    replica.requests.discard(flight.request_id)
                    await self._route(flight, "busy")
                else:
                    self._end(flight, SpeechError(body.status, body.message, body.code))


# ---------------------------------------------------------------------- HTTP routes


class VoiceRef(msgspec.Struct, frozen=True):
    id: str


class SpeechBody(msgspec.Struct, frozen=True):
    """OpenAI's speech request body (unknown fields are ignored, as OpenAI does)."""

    model: str
    input: str
    voice: str | VoiceRef
    response_format: str = "wav"
    speed: float = 1.0
    stream_format: str = "audio"
    instructions: str = ""
    # meshserve extensions
    sample_rate: int = DEFAULT_SAMPLE_RATE
    stream: bool = True


def parse_speech_body(raw: bytes) -> SpeechBody:
    try:
        body = msgspec.json.decode(raw, type=SpeechBody)
    except msgspec.ValidationError as e:
        message, _, where = str(e).rpartition(" - at `$.")
        param = where.rstrip("`") if message else None
        raise _bad(message or str(e), param) from e
    except msgspec.DecodeError as e:
        raise _bad(f"request body is not valid JSON: {e}", None) from e
    if not body.input.strip():
        raise _bad("input is empty", "input")
    if len(body.input) > MAX_INPUT_CHARS:
        raise _bad(f"input is longer than {MAX_INPUT_CHARS} characters", "input")
    if body.response_format not in RESPONSE_FORMATS:
        unsupported = body.response_format in UNSUPPORTED_FORMATS
        why = " (meshserve ships no encoder for it)" if unsupported else ""
        raise _bad(f"response_format {body.response_format!r} is not supported{why}; use one of "
                   f"{', '.join(RESPONSE_FORMATS)}", "response_format")
    if body.stream_format not in ("audio", "sse"):
        raise _bad(f"stream_format must be 'audio' or 'sse', got {body.stream_format!r}",
                   "stream_format")
    if not MIN_SPEED <= body.speed <= MAX_SPEED or math.isnan(body.speed):
        raise _bad(f"speed must be within {MIN_SPEED} and {MAX_SPEED}", "speed")
    if not 8000 <= body.sample_rate <= 48000:
        raise _bad("sample_rate must be within 8000 and 48000", "sample_rate")
    return body


async def _read_body(request: Request) -> bytes:
    """The request body, refused (413) past ``MAX_BODY_BYTES`` before it is all read."""
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise SpeechError(413, f"request body over {MAX_BODY_BYTES} bytes", "body_too_large")
    return bytes(body)


class SpeechSpan:
    """The server span of one speech request (OTel GenAI attributes where they fit)."""

    def __init__(self, body: SpeechBody, headers: dict[str, str] | None) -> None:
        carrier = {k: v for k in ("traceparent", "tracestate") if (v := (headers or {}).get(k))}
        parent = _propagator.extract(carrier) if carrier else Context()
        self.span = _tracer.start_span(
            f"text_to_speech {body.model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "text_to_speech",
                "gen_ai.request.model": body.model,
                "meshserve.speech.voice": body.voice if isinstance(body.voice, str)
                else body.voice.id,
                "meshserve.speech.input_chars": len(body.input),
                "meshserve.speech.response_format": body.response_format,
                "meshserve.speech.stream_format": body.stream_format,
                "http.request.method": "POST",
                "url.path": "/v1/audio/speech",
            },
        )
        self.context = trace.set_span_in_context(self.span, parent)

    def end(self, flight: SpeechFlight | None, error: SpeechError | None) -> None:
        if flight is not None:
            if flight.first_audio_s is not None:
                self.span.set_attribute("meshserve.speech.time_to_first_audio_s",
                                        flight.first_audio_s)
            if flight.sample_rate:
                self.span.set_attribute("meshserve.speech.audio_seconds",
                                        flight.samples / flight.sample_rate)
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error.message))
            self.span.set_attributes({"error.type": error.code,
                                      "http.response.status_code": error.status})
        self.span.end()


class AudioStream(Response):
    """A streamed body that stops as soon as the client goes away and always runs
    ``on_close`` (also when the client left before the first byte)."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        media_type: str,
        headers: dict[str, str],
        on_close: Callable[[], Awaitable[None]],
    ) -> None:
        self.body_iterator = body
        self.on_close = on_close
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                try:
                    async for chunk in self.body_iterator:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                except SpeechError as error:
                    # Headers are out: the only honest signal left is to end the
                    # connection without completing the body (uvicorn closes it).
                    log.warning("speech stream failed mid-way, connection aborted",
                                status=error.status, code=error.code, message=error.message)
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.on_close()


class SpeechRoutes:
    """Handlers of ``/v1/audio/speech`` and ``/v1/audio/voices``."""

    def __init__(self, gateway: SpeechGateway, *, request_timeout_s: float = 600.0) -> None:
        self.gateway = gateway
        self.request_timeout_s = request_timeout_s

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/audio/speech", self.speech, methods=["POST"]),
            Route("/v1/audio/voices", self.voices, methods=["GET"]),
        ]

    async def voices(self, request: Request) -> Response:
        data = [
            {"id": v.name, "object": "voice", "name": v.name, "language": v.language,
             "gender": v.gender or None, "description": v.description}
            for v in self.gateway.voices()
        ]
        return Response(msgspec.json.encode({"object": "list", "data": data}),
                        media_type="application/json")

    async def speech(self, request: Request) -> Response:
        try:
            body = parse_speech_body(await _read_body(request))
        except SpeechError as error:
            return error.response()
        span = SpeechSpan(body, dict(request.headers))
        voice = body.voice if isinstance(body.voice, str) else body.voice.id
        mesh_request = SpeechRequest(
            request_id=f"speech-{uuid.uuid4().hex}",
            input=body.input,
            voice=voice,
            speed=body.speed,
            sample_rate=body.sample_rate,
            model=body.model,
            instructions=body.instructions,
        )
        flight: SpeechFlight | None = None
        try:
            flight = await self.gateway.open(mesh_request, span.context)
            # Headers wait for the first audio (or the error), so a request that fails
            # early gets a proper status instead of a 200 with a broken body.
            first = await self._next(flight)
        except SpeechError as error:
            if flight is not None:
                await self.gateway.close(flight)
            span.end(flight, error)
            log.info("speech request failed", status=error.status, code=error.code,
                     message=error.message)
            return error.response()
        if body.stream and body.stream_format == "audio":
            return self._stream_audio(body, flight, first, span)
        if body.stream_format == "sse":
            return self._stream_sse(body, flight, first, span)
        return await self._whole(request, body, flight, first, span)

    async def _next(self, flight: SpeechFlight) -> bytes | None:
        with anyio.move_on_after(self.request_timeout_s) as waited:
            return await flight.next()
        if waited.cancelled_caught:
            raise SpeechError(504, f"no audio from the mesh in {self.request_timeout_s:g} s",
                              "timeout")
        return None

    def _closer(self, flight: SpeechFlight, span: SpeechSpan) -> Callable[[], Awaitable[None]]:
        async def close() -> None:
            if not flight.ended:
                log.info("speech client disconnected", request_id=flight.request_id)
            await self.gateway.close(flight)  # a request still running fails with 499
            span.end(flight, flight.error)

        return close

    async def _audio(self, flight: SpeechFlight, first: bytes | None) -> AsyncIterator[bytes]:
        if first:
            yield first
        while (pcm := await self._next(flight)) is not None:
            yield pcm

    def _stream_audio(
        self, body: SpeechBody, flight: SpeechFlight, first: bytes | None, span: SpeechSpan
    ) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            if body.response_format == "wav":
                yield wav_header(flight.sample_rate, None)
            # A SpeechError here reaches AudioStream, which aborts the connection: the
            # client sees a broken transfer, not a complete-looking short file.
            async for pcm in self._audio(flight, first):
                yield pcm

        return AudioStream(stream(), MEDIA_TYPES[body.response_format],
                           self._headers(flight), self._closer(flight, span))

    def _stream_sse(
        self, body: SpeechBody, flight: SpeechFlight, first: bytes | None, span: SpeechSpan
    ) -> Response:
        def event(payload: dict[str, object]) -> bytes:
            return b"data: " + msgspec.json.encode(payload) + b"\n\n"

        def delta(audio: bytes) -> bytes:
            return event({"type": "speech.audio.delta",
                          "audio": base64.b64encode(audio).decode()})

        async def stream() -> AsyncIterator[bytes]:
            header = wav_header(flight.sample_rate, None) if body.response_format == "wav" else b""
            try:
                async for pcm in self._audio(flight, first):
                    yield delta(header + pcm)
                    header = b""
            except SpeechError as error:
                yield event({"type": "error", "error": msgspec.json.decode(error.body())["error"]})
                return
            # No tokens in espeak-ng: usage counts input characters.
            chars = len(body.input)
            yield event({"type": "speech.audio.done",
                         "usage": {"input_tokens": chars, "output_tokens": 0,
                                   "total_tokens": chars}})

        return AudioStream(stream(), "text/event-stream", self._headers(flight),
                           self._closer(flight, span))

    async def _whole(
        self, request: Request, body: SpeechBody, flight: SpeechFlight, first: bytes | None,
        span: SpeechSpan,
    ) -> Response:
        pieces: list[bytes] = [first] if first else []
        error: SpeechError | None = None
        try:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def watch_disconnect() -> None:
                        while (await request.receive())["type"] != "http.disconnect":
                            pass
                        scope.cancel()

                    tg.start_soon(watch_disconnect)
                    try:
                        while (pcm := await self._next(flight)) is not None:
                            pieces.append(pcm)
                    except SpeechError as e:
                        error = e
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.gateway.close(flight)
        span.end(flight, error)
        if error is not None:
            return error.response()
        if not flight.done:
            return Response(status_code=499)  # the client left; nobody reads this
        pcm = b"".join(pieces)
        if body.response_format == "wav":
            pcm = wav_header(flight.sample_rate, len(pcm) // 2) + pcm
        return Response(pcm, media_type=MEDIA_TYPES[body.response_format],
                        headers=self._headers(flight))

    @staticmethod
    def _headers(flight: SpeechFlight) -> dict[str, str]:
        return {"x-request-id": flight.request_id, "x-sample-rate": str(flight.sample_rate)}


def speech_routes(gateway: SpeechGateway, *, request_timeout_s: float = 600.0) -> list[BaseRoute]:
    """The speech routes, to mount beside the text routes."""
    return SpeechRoutes(gateway, request_timeout_s=request_timeout_s).routes()
