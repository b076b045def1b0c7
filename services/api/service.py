"""The api actor: the mesh side of the HTTP gateway.

    HTTP handler ──submit(flight)──▶ GenerateRequest ──▶ tokenizer replica (least loaded)
    HTTP handler ◀── Flight.wait() ◀── TextBatch / RequestFailed ◀── tokenizer replicas
    HTTP handler ──release(flight)─▶ Abort ──▶ scheduler and the holding tokenizer
    scheduler ──SchedulerStatus (every heartbeat)──▶ /health, runtime.ready

Sockets: a ROUTER bound at ``MESHSERVE_API_ADDR`` (tokenizer replicas connect) and
a DEALER to the scheduler. One task drains each endpoint's inbox; HTTP handlers
send directly (zmq.asyncio sockets serve many coroutines of one loop) and never
receive, so nothing here waits on a client.

A tokenizer replica that is lost takes nothing with it: each unfinished request
it held is sent again to the least loaded remaining replica (the scheduler ignores
the duplicate Submit and re-assigns detokenization itself; text replayed from
offset 0 is deduplicated by ``FlightRegistry.apply``). With no replica left, those
requests fail with 503.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import zmq
from anyio.abc import TaskStatus

from services.api.config import ApiConfig
from services.api.drain import Drain
from services.api.errors import ApiError
from services.api.health import MeshHealth
from services.api.openai_schema import HealthReport
from services.api.requests import (
    Choice,
    DeltaOutcome,
    Flight,
    FlightRegistry,
    group_by_holder,
    pick_replica,
)
from services.api.tokenize_calls import TokenizeCalls
from shared.endpoints import bind_router, connect_dealer
from shared.logs import get_logger
from shared.mesh import (
    DealerEndpoint,
    PeerJoined,
    PeerLost,
    Received,
    RouterEndpoint,
    UpstreamJoined,
    UpstreamLost,
)
from shared.protocol.common import Rejected
from shared.protocol.generation import (
    Abort,
    GenerateRequest,
    RequestFailed,
    SchedulerStatus,
    TextBatch,
)
from shared.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResult,
    TokenizeRequest,
    TokenizeResult,
)
from shared.service import ServiceRuntime

log = get_logger("meshserve.api")

TOKENIZER = "tokenizer"

# What each socket may carry towards the api; anything else is rejected by the endpoint.
FromTokenizer = TextBatch | RequestFailed | TokenizeResult | DetokenizeResult
FromScheduler = SchedulerStatus | RequestFailed


@dataclass(frozen=True, slots=True)
class MeshGauges:
    """What /metrics reports of the mesh, as the api sees it."""

    scheduler: SchedulerStatus | None
    tokenizers: int
    inflight: int
    rejected_messages: int


class ApiActor:
    """Owns the api's sockets and every in-flight request."""

    def __init__(self, runtime: ServiceRuntime, config: ApiConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.tokenizers: RouterEndpoint[FromTokenizer] = bind_router(
            runtime, runtime.addresses.api_addr, FromTokenizer
        )
        # The scheduler needs only who the api is; its readiness is for the supervisor.
        self.scheduler: DealerEndpoint[FromScheduler] = connect_dealer(
            runtime, runtime.addresses.scheduler_addr, FromScheduler,
            hello=runtime.identity.hello,
        )
        self.registry = FlightRegistry(config.max_inflight)
        self.tokenize_calls = TokenizeCalls()  # /tokenize and /detokenize in flight
        self.health = MeshHealth(runtime.process.heartbeat_s)
        self.drain = Drain()  # shared with the speech gateway: both refuse while draining
        self.stopping = False

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, connect, report started, then serve the mesh until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.tokenizers.run)
                await tg.start(self.scheduler.run)
                tg.start_soon(self._tokenizer_events)
                tg.start_soon(self._scheduler_events)
                tg.start_soon(self._refresh_ready)
                log.info(
                    "mesh side up",
                    api_addr=self.tokenizers.address,
                    scheduler_addr=self.scheduler.address,
                )
                task_status.started()
        finally:
            self.stop()

    def stop(self) -> None:
        """Shutdown: fail every in-flight request so that its handler answers at
        once (503), and stop using the sockets, which are closing. Idempotent."""
        self.stopping = True
        self.fail_all(ApiError(503, "the api is shutting down", code="shutting_down"))

    def fail_all(self, error: ApiError) -> None:
        for flight in self.registry.flights():
            flight.fail(error)
        self.tokenize_calls.fail_all(error)

    # --- what HTTP handlers call --------------------------------------------------

    def gauges(self) -> MeshGauges:
        return MeshGauges(
            scheduler=self.health.fresh_status(time.monotonic()),
            tokenizers=len(self._tokenizer_candidates()),
            inflight=len(self.registry),
            rejected_messages=self.tokenizers.rejections.count + self.scheduler.rejections.count,
        )

    def health_report(self) -> HealthReport:
        """Readiness: /health, /health/ready and ``runtime.ready``."""
        return self.health.report(len(self._tokenizer_candidates()), time.monotonic(),
                                  draining=self.drain.draining)

    def max_model_len(self) -> int | None:
        """The context length the scheduler last reported; None before a worker."""
        status = self.health.scheduler
        return status.max_model_len if status is not None and status.max_model_len else None

    async def call_tokenizer(
        self, call: TokenizeRequest | DetokenizeRequest
    ) -> TokenizeResult | DetokenizeResult:
        """``/tokenize`` / ``/detokenize`` at the least loaded tokenizer replica; its
        answer or its ApiError (400 bad prompt, 503 no replica, 504 no answer)."""
        if self.stopping:
            raise ApiError(503, "the api is shutting down", code="shutting_down")
        holder = pick_replica(self._tokenizer_candidates(), self.registry.outstanding())
        if holder is None:
            raise ApiError(503, "no tokenizer replica is connected; retry later",
                           code="no_tokenizer")
        pending = self.tokenize_calls.open(call.request_id, holder)
        try:
            await self.tokenizers.send(holder, call)
            return await pending.result(self.config.request_timeout_s)
        finally:
            self.tokenize_calls.close(pending)

    async def submit(self, flight: Flight) -> None:
        """Register a flight and send each choice to a tokenizer replica.

        Raises 503 when no tokenizer replica is connected and 429 when the api is
        at its in-flight bound; after that, failures arrive through the flight.
        """
        if self.stopping:
            raise ApiError(503, "the api is shutting down", code="shutting_down")
        self.drain.check_open()
        if not self._tokenizer_candidates():
            raise ApiError(503, "no tokenizer replica is connected; retry later",
                           code="no_tokenizer")
        self.registry.open(flight)
        await self._dispatch(flight, flight.choices)

    async def release(self, flight: Flight) -> None:
        """The handler is done with a flight: forget it and abort what is unfinished,
        at the scheduler and at each holding tokenizer at once. Idempotent."""
        unfinished = self.registry.close(flight)
        self.drain.changed()
        if not unfinished:
            return
        ids = [choice.request_id for choice in unfinished]
        if self.stopping:
            # The sockets are closing: nothing can be sent any more.
            log.info("not aborting: shutting down", request_ids=ids)
            return
        log.info("aborting", request_ids=ids)
        try:
            await self._abort(ids, unfinished, flight)
        except zmq.ZMQError as e:
            if not self.stopping:
                raise
            log.info("abort not sent: shutting down", request_ids=ids, error=str(e))

    # --- internals ----------------------------------------------------------------

    def _tokenizer_candidates(self) -> list[bytes]:
        return [
            peer.identity
            for peer in self.tokenizers.peers_of(TOKENIZER)
            if peer.hello.ready
        ]

    async def _dispatch(self, flight: Flight, choices: list[Choice]) -> None:
        """Send a flight's request (all its ``n`` choices in one message: they fork
        at the scheduler) to the least loaded tokenizer replica.

        The holder is recorded before the send: if that replica is lost while the
        send is pending, the PeerLost handler finds the choices and re-sends them.
        """
        holder = pick_replica(self._tokenizer_candidates(), self.registry.outstanding())
        if holder is None:
            for choice in choices:
                choice.holder = None
            flight.fail(ApiError(
                503, "the tokenizer replica serving this request was lost and no other "
                "replica is connected", code="no_tokenizer",
            ))
            return
        for choice in choices:
            choice.holder = holder
        request: GenerateRequest = flight.plan.mesh_request
        # A False return means the replica vanished; the router has queued a PeerLost
        # for it, and _on_tokenizer_lost re-sends this choice elsewhere.
        await self.tokenizers.send(holder, request, flight.context)

    async def _abort(self, ids: list[str], choices: list[Choice], flight: Flight) -> None:
        abort = Abort(request_ids=ids, reason="client")
        await self.scheduler.send(abort, flight.context)
        for holder, held_ids in group_by_holder(choices).items():
            if holder is not None and holder in self.tokenizers.peers:
                await self.tokenizers.send(holder, Abort(request_ids=held_ids, reason="client"),
                                           flight.context)

    async def _tokenizer_events(self) -> None:
        async for event in self.tokenizers.inbox:
            match event:
                case Received(body=TextBatch() as batch):
                    await self._on_text(event, batch)
                case Received(body=TokenizeResult() | DetokenizeResult() as answer):
                    if not self.tokenize_calls.answer(answer):
                        log.info("tokenize answer after its call ended",
                                 request_id=answer.request_id)
                case Received(body=RequestFailed() as failed):
                    if not self.tokenize_calls.failed(failed):
                        self._on_failed(failed, event.envelope.sender)
                case PeerJoined(peer=peer):
                    log.info("replica joined", peer=peer.name, ready=peer.hello.ready)
                case PeerLost(peer=peer, reason=reason):
                    await self._on_replica_lost(peer.identity, peer.name, reason)
                case _:
                    log.warning("unexpected event on the tokenizer socket",
                                event=type(event).__name__)

    async def _on_text(self, event: Received[FromTokenizer], batch: TextBatch) -> None:
        for delta in batch.deltas:
            outcome = self.registry.apply(delta)
            if outcome in (DeltaOutcome.UNKNOWN, DeltaOutcome.INCONSISTENT):
                reason = (
                    f"TextDelta for unknown request {delta.request_id!r}"
                    if outcome is DeltaOutcome.UNKNOWN
                    else f"inconsistent TextDelta for {delta.request_id!r}: offset "
                    f"{delta.offset}, tokens {delta.prompt_tokens}/{delta.completion_tokens}"
                )
                self.tokenizers.rejections.record(event.envelope.sender, reason)
                assert event.peer is not None
                await self.tokenizers.send(
                    event.peer, Rejected(reason=reason, msg_id=event.envelope.msg_id),
                    event.context,
                )
            elif outcome is DeltaOutcome.GAP:
                log.warning("text went missing before this delta; delivered anyway",
                            request_id=delta.request_id, offset=delta.offset,
                            sender=event.envelope.sender)

    def _on_failed(self, failed: RequestFailed, sender: str) -> None:
        error = ApiError(failed.status, failed.message, code=failed.code)
        if self.registry.fail(failed.request_id, error) is None:
            if not self.registry.knows(failed.request_id):
                self.tokenizers.rejections.record(
                    sender, f"RequestFailed for unknown request {failed.request_id!r}"
                )
            return
        log.info("request failed", request_id=failed.request_id, status=failed.status,
                 code=failed.code, sender=sender)

    async def _on_replica_lost(self, identity: bytes, name: str, reason: str) -> None:
        self.tokenize_calls.replica_lost(identity)
        held = self.registry.held_by(identity)
        log.warning("replica lost", peer=name, reason=reason, requests=len(held))
        # One re-send per flight: the tokenizer re-submits, the scheduler moves the
        # live choices over and tells the new replica which ones ended already.
        by_flight: dict[int, tuple[Flight, list[Choice]]] = {}
        for flight, choice in held:
            by_flight.setdefault(id(flight), (flight, []))[1].append(choice)
        for flight, choices in by_flight.values():
            await self._dispatch(flight, choices)

    async def _scheduler_events(self) -> None:
        async for event in self.scheduler.inbox:
            match event:
                case Received(body=SchedulerStatus() as status):
                    self.health.on_scheduler_status(status, time.monotonic())
                case Received(body=RequestFailed() as failed):
                    self._on_failed(failed, event.envelope.sender)
                case Received(body=Rejected() as rejected):
                    log.warning("the scheduler rejected a message", reason=rejected.reason)
                case UpstreamJoined(restarted=restarted):
                    # A restarted scheduler holds none of our requests, but the
                    # tokenizers resubmit each one they hold: streams only pause.
                    log.info("scheduler connected", restarted=restarted)
                case UpstreamLost(reason=reason):
                    log.warning("scheduler lost", reason=reason)
                    self.health.on_scheduler_lost()
                case _:
                    log.warning("unexpected event on the scheduler socket",
                                event=type(event).__name__)

    async def _refresh_ready(self) -> None:
        """``runtime.ready`` follows /health; the supervisor reads it every beat."""
        while True:
            ready = self.health_report().status == "ok"
            if ready != self.runtime.ready:
                log.info("readiness changed", ready=ready)
                self.runtime.ready = ready
            await anyio.sleep(self.runtime.process.heartbeat_s)
