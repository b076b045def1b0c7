"""The api's side of the speech socket: tts replicas and in-flight speech requests,
beside ``ApiActor`` (the text side's actor) in the same process.

    HTTP handler ──open()──▶ SpeechRequest ──▶ tts replica (least outstanding per engine)
    HTTP handler ◀── SpeechFlight.next() ◀── SpeechChunk / SpeechFailed ◀── tts replicas
    HTTP handler ──close()──▶ SpeechCancel (client gone, error, timeout) ──▶ its replica

The gateway binds a ROUTER at ``MESHSERVE_SPEECH_ADDR``; tts replicas connect and send
their ``SpeechCatalog`` (voices, models) once their engines are up. A replica that
answers busy gets the request re-routed to the least loaded replica not yet tried;
a replica that is lost has its requests re-sent elsewhere, and the audio the client
already has is skipped by ``sample_offset``, so nothing repeats. With no replica left,
the request fails with 503. Limits come from ``ApiConfig`` (``speech_*``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus
from opentelemetry.context import Context

from services.api.config import ApiConfig
from services.api.drain import Drain
from services.api.errors import ApiError, bad_request
from services.api.metrics import SpeechMetrics
from services.api.speech_flight import SpeechFlight
from shared.endpoints import bind_router
from shared.logs import get_logger
from shared.mesh import Peer, PeerJoined, PeerLost, Received, RouterEndpoint
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
from shared.service import ServiceRuntime

log = get_logger("meshserve.api.speech")

TTS = "tts"


def _bad_request(message: str, param: str | None) -> ApiError:
    # Speech's 400s have always carried OpenAI's type as their code.
    return bad_request(message, param, code="invalid_request_error")


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

    def serves(self, request: SpeechRequest) -> bool:
        return self.catalog is not None and self.catalog.serves(request)



class SpeechGateway:
    """The api's side of the speech socket: tts replicas and in-flight requests."""

    def __init__(
        self,
        runtime: ServiceRuntime,
        config: ApiConfig,
        *,
        status_interval_s: float = 1.0,
        drain: Drain | None = None,
    ) -> None:
        self.router: RouterEndpoint[SpeechFromTts] = bind_router(
            runtime, runtime.addresses.speech_addr, SpeechFromTts
        )
        self.replicas: dict[bytes, TtsReplica] = {}
        self.flights: dict[str, SpeechFlight] = {}
        self.config = config
        self.metrics = SpeechMetrics()
        self.status_interval_s = status_interval_s
        self._replicas_changed = anyio.Event()
        # The api's drain (server.py passes the text actor's): new speech is refused
        # while draining, and each closed flight wakes the drain's wait.
        self.drain = drain or Drain()

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
                flight.fail(ApiError(503, "the api is shutting down", code="shutting_down"))

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

    def check(self, request: SpeechRequest) -> None:
        """Raise the ApiError a request would get from every ready replica."""
        catalogs = [r.catalog for r in self.ready_replicas() if r.catalog is not None]
        if not catalogs:
            raise ApiError(503, "no text-to-speech replica is ready", code="service_unavailable")
        if not any(c.has_model(request.model) for c in catalogs):
            known = sorted({m for c in catalogs for m in c.models})
            raise ApiError(404, f"The model `{request.model}` does not exist; speech models: "
                           f"{', '.join(known)}", code="model_not_found", param="model")
        if not any(c.serves(request) for c in catalogs):
            raise _bad_request(f"unknown voice {request.voice!r}; GET /v1/audio/voices lists "
                               "them", "voice")

    # --- flights ---------------------------------------------------------------------

    def _pick(self, flight: SpeechFlight) -> TtsReplica | None:
        candidates = [
            r for r in self.ready_replicas()
            if r.peer.identity not in flight.tried and r.serves(flight.request)
        ]
        return min(candidates, key=lambda r: (r.load, len(r.requests), r.peer.name), default=None)

    async def open(self, request: SpeechRequest, context: Context) -> SpeechFlight:
        """Send ``request`` to the least loaded replica that can serve it."""
        self.drain.check_open()
        self.check(request)
        limit = self.config.speech_max_inflight
        if len(self.flights) >= limit:
            raise ApiError(429, f"{limit} speech requests are in flight", code="server_busy")
        if request.request_id in self.flights:
            raise _bad_request(f"request id {request.request_id!r} is in use", None)
        flight = SpeechFlight(request, context, self.config.speech_max_buffered_bytes)
        self.flights[request.request_id] = flight
        self.metrics.running += 1
        await self._route(flight, "new")
        return flight

    async def _route(self, flight: SpeechFlight, why: str) -> None:
        """Send the flight to a replica it has not tried, or fail it."""
        while not flight.ended:
            attempts_left = len(flight.tried) < self.config.speech_max_attempts
            replica = self._pick(flight) if attempts_left else None
            if replica is None:
                if why == "busy":
                    error = ApiError(429, "every text-to-speech replica is busy",
                                     code="server_busy")
                else:
                    error = ApiError(503, "no text-to-speech replica could take the "
                                     f"request ({why})", code="service_unavailable")
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
        self.drain.changed()
        self.metrics.running -= 1
        replica = self.replicas.get(flight.replica) if flight.replica else None
        if replica is not None:
            replica.requests.discard(flight.request_id)
        if not flight.ended:
            flight.fail(ApiError(499, "client closed the request", code="cancelled"))
            self._count(flight, "cancelled")
            if replica is not None:
                await self.router.send(replica.peer, SpeechCancel([flight.request_id]),
                                       flight.context)
        else:
            self._count(flight, "ok" if flight.error is None else "error")

    def _count(self, flight: SpeechFlight, outcome: str) -> None:
        self.metrics.finished(outcome, len(flight.request.input), flight.audio_s,
                              flight.first_audio_s, time.monotonic() - flight.started)

    def _end(self, flight: SpeechFlight, error: ApiError | None = None) -> None:
        """The mesh is done with the flight (the handler still reads what is left)."""
        replica = self.replicas.get(flight.replica) if flight.replica else None
        if replica is not None:
            replica.requests.discard(flight.request_id)
        if error is not None:
            flight.fail(error)

    def render_metrics(self) -> str:
        """The speech part of the api's /metrics, with each replica's last status."""
        statuses = {r.peer.name: r.status for r in self.replicas.values() if r.status}
        return self.metrics.render(statuses)

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
                await self._on_audio(peer, replica, body)

    async def _on_audio(
        self, peer: Peer, replica: TtsReplica, body: SpeechChunk | SpeechFailed
    ) -> None:
        flight = self.flights.get(body.request_id)
        if flight is None or flight.replica != peer.identity or flight.ended:
            # A request this replica should not be working on (finished,
            # cancelled, or re-routed away): tell it to stop.
            if isinstance(body, SpeechChunk) and not body.final:
                log.debug("stray speech chunk", replica=peer.name, request_id=body.request_id)
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
            self._end(flight, ApiError(body.status, body.message, code=body.code))
