"""The scheduler actor: a bound ROUTER for tokenizers, workers and the api, and a
DEALER to the KV manager, around the pure ``Scheduler``.

Every handler is short and synchronous apart from its sends: planning happens in
``Scheduler.plan`` (no I/O), and the actor keeps each worker ``steps_in_flight``
steps ahead, so a worker finds its next step already queued when it finishes one.
"""

from __future__ import annotations

import time
from collections import defaultdict

import anyio
import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, set_span_in_context

from services.scheduler import ownership
from services.scheduler.config import ROUTING_MODES, SchedulerConfig
from services.scheduler.handoff import Transfer
from services.scheduler.outcomes import RequestFailure, RequestOutput
from services.scheduler.request import Request
from services.scheduler.scheduler import Scheduler
from services.scheduler.stats import SchedulerStats
from services.scheduler.step_log import StepLog
from services.scheduler.worker_slot import WorkerSlot
from shared.config import load_config
from shared.endpoints import bind_router, connect_dealer
from shared.logs import get_logger
from shared.mesh import (
    DealerEndpoint,
    Peer,
    PeerJoined,
    PeerLost,
    Received,
    RouterEndpoint,
    UpstreamJoined,
    UpstreamLost,
)
from shared.protocol.common import Rejected
from shared.protocol.envelope import pack_i32
from shared.protocol.generation import (
    Abort,
    Reassign,
    SchedulerStatus,
    SetRouting,
    Submit,
    TokenBatch,
    TokenOutput,
    WorkerStatus,
)
from shared.protocol.kv import (
    KvHostResize,
    KvLease,
    KvPoolClose,
    KvPoolOpen,
    KvStats,
    KvStatsRequest,
)
from shared.protocol.step import StepResult
from shared.protocol.transfer import KvTransferCancel, KvTransferDone
from shared.service import ServiceRuntime
from shared.telemetry import inject_context, tracer

log = get_logger("meshserve.scheduler")
_tracer = tracer("meshserve.scheduler")

# Events handled before the next plan at most, so a flood of Submits cannot keep a
# worker that just finished a step waiting for its next one.
MAX_EVENTS_PER_PLAN = 512

# KvStatsRequest: `meshserve kv stats` asks for the counters this actor keeps.
# SetRouting: `meshserve kv set routing MODE`.
# KvTransferDone: a worker's side of a prefill/decode hand-off ended (handoff.py).
SchedulerInbound = Submit | Abort | StepResult | KvStatsRequest | SetRouting | KvTransferDone
KvInbound = KvLease | KvStats | KvHostResize


class SchedulerActor:
    def __init__(self, runtime: ServiceRuntime, config: SchedulerConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.scheduler = Scheduler(config)
        self.router: RouterEndpoint[SchedulerInbound] = bind_router(
            runtime, runtime.addresses.scheduler_addr, SchedulerInbound
        )
        # The KV manager needs only who the scheduler is, not its readiness.
        self.kv: DealerEndpoint[KvInbound] = connect_dealer(
            runtime, runtime.addresses.kvcache_addr, KvInbound, hello=runtime.identity.hello
        )
        self.peers_by_name: dict[str, Peer] = {}
        self.step_log = StepLog(config.step_log)
        # Set by events that change what the next step could hold; the run loop plans
        # once per batch of ready events.
        self._replan = False

    async def run(self) -> None:
        try:
            await self._serve()
        finally:
            self.step_log.close()

    async def _serve(self) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.router.run)
            await tg.start(self.kv.run)
            tg.start_soon(self._consume_kv)
            tg.start_soon(self._report_status)
            async for event in self.router.inbox:
                await self._on_router_event(event)
                # Batched admission: take every event already waiting before planning,
                # so that requests arriving together start in one step rather than
                # one small step each (the in-process engine sees them all at once).
                for _ in range(MAX_EVENTS_PER_PLAN):
                    try:
                        event = self.router.inbox.receive_nowait()
                    except anyio.WouldBlock:
                        break
                    await self._on_router_event(event)
                if self._replan:
                    self._replan = False
                    await self._flush()
                    await self._pump_all()

    # ------------------------------------------------------------------ events

    async def _on_router_event(self, event: object) -> None:
        match event:
            case Received(peer=Peer() as peer, body=Submit() as body):
                await self._on_submit(peer, body, event)
            case Received(body=Abort() as body):
                self.scheduler.abort(body.request_ids)
                self._replan = True
            case Received(peer=Peer() as peer, body=KvStatsRequest()):
                await self.router.send(peer, self._status())
            case Received(peer=Peer() as peer, body=SetRouting() as body, envelope=envelope):
                await self._on_set_routing(peer, body, envelope.msg_id)
            case Received(peer=Peer() as peer, body=StepResult() as body):
                self.step_log.result(peer.name, body.step_id)
                self.scheduler.on_result(peer.name, body)
                self._replan = True
            case Received(peer=Peer() as peer, body=KvTransferDone() as body):
                if not self.scheduler.handoffs.on_done(peer.name, body):
                    log.info("transfer report for no live hand-off", peer=peer.name,
                             transfer_id=body.transfer_id, ok=body.ok)
                self._replan = True
            case Received(peer=Peer() as peer, body=body, envelope=envelope):
                reason = f"{type(body).__name__} is not expected from {peer.name}"
                self.router.rejections.record(envelope.sender, reason)
                await self.router.send(peer, Rejected(reason=reason, msg_id=envelope.msg_id))
            case PeerJoined(peer=peer):
                await self._on_peer_joined(peer)
            case PeerLost(peer=peer, reason=reason):
                await self._on_peer_lost(peer, reason)

    async def _on_submit(self, peer: Peer, body: Submit, event: Received[Submit]) -> None:
        if peer.hello.service != "tokenizer":
            reason = f"Submit is only accepted from tokenizers, not {peer.name}"
            self.router.rejections.record(peer.name, reason)
            await self.router.send(peer, Rejected(reason=reason))
            return
        result = self.scheduler.submit(body, owner=peer.name, context=event.context)
        for takeover in result.takeovers:
            await self._reassign(takeover.request, peer)
            # The api and the scheduler may pick different successors after a
            # tokenizer died: the replica left behind must drop its state.
            previous = self.peers_by_name.get(takeover.previous_owner)
            if previous is not None:
                await self.router.send(
                    previous, Abort([takeover.request.request_id], reason="reassigned"))
        if result.ended:
            # A re-sent n > 1 request: choices that ended already will get no more
            # outputs; the new owner must not keep state for them.
            await self.router.send(peer, Abort(result.ended, reason="finished"))
        if body.resumed and result.queued:
            log.info("request resumed", request_id=body.request_id, owner=peer.name,
                     outputs=result.queued[0].num_outputs)
        for request in result.queued:
            request.span = _tracer.start_span(
                "scheduler.request", context=event.context,
                attributes={"gen_ai.request.id": request.request_id,
                            "gen_ai.usage.input_tokens": request.prompt_len,
                            "meshserve.priority": body.priority},
            )
        self._replan = True

    async def _on_set_routing(self, peer: Peer, body: SetRouting, msg_id: int) -> None:
        if body.routing not in ROUTING_MODES:
            reason = f"routing must be one of {', '.join(ROUTING_MODES)}, not {body.routing!r}"
            self.router.rejections.record(peer.name, reason)
            await self.router.send(peer, Rejected(reason=reason, msg_id=msg_id))
            return
        self.scheduler.waiting.placement.mode = body.routing
        log.info("routing changed", routing=body.routing, by=peer.name)
        await self.router.send(peer, self._status())

    async def _on_peer_joined(self, peer: Peer) -> None:
        self.peers_by_name[peer.name] = peer
        log.info("peer joined", peer=peer.name)
        hello = peer.hello
        if hello.service == "worker":
            if hello.worker is None:
                log.warning("worker said hello without its details", peer=peer.name)
                return
            await self._open_pool(self.scheduler.add_worker(peer.name, hello.worker))
            self._replan = True
        elif hello.service == "tokenizer":
            # Requests whose tokenizer died while no other replica was up.
            for request in ownership.adopt_orphans(self.scheduler.requests, peer.name):
                await self._reassign(request, peer)
        elif hello.service == "api":
            await self.router.send(peer, self._status())

    async def _on_peer_lost(self, peer: Peer, reason: str) -> None:
        self.peers_by_name.pop(peer.name, None)
        log.warning("peer lost", peer=peer.name, reason=reason)
        if peer.hello.service == "worker":
            requeued = self.scheduler.remove_worker(peer.name)
            await self.kv.send(KvPoolClose(pool_id=peer.name))
            if requeued:
                log.warning("requeued requests of a lost worker", worker=peer.name,
                            requests=len(requeued))
            self._replan = True
        elif peer.hello.service == "tokenizer":
            successors = {p.name: p for p in self.router.peers_of("tokenizer")}
            for request in ownership.reassign(
                    self.scheduler.requests, peer.name, list(successors)):
                await self._reassign(request, successors[request.owner])

    async def _open_pool(self, message: KvPoolOpen) -> None:
        # Signed with this incarnation: the KV manager closes the pools a dead
        # scheduler incarnation left behind (their leases and holds).
        owner = self.runtime.identity.incarnation
        await self.kv.send(msgspec.structs.replace(message, owner=owner))

    async def _reassign(self, request: Request, peer: Peer) -> None:
        # Sampling, priority and salt too: the new owner resumes the request from
        # them should this scheduler restart.
        await self.router.send(peer, Reassign(
            request_id=request.request_id,
            detokenize=request.detokenize,
            prompt_token_ids=request.token_ids[: request.prompt_len].tobytes(),
            output_token_ids=request.token_ids[request.prompt_len:].tobytes(),
            sampling=request.sampling,
            priority=request.priority,
            cache_salt=request.salt,
        ))

    # ----------------------------------------------------------------- sending

    async def _flush(self) -> None:
        """Send what the last calls produced: one TokenBatch per tokenizer."""
        outputs, failures = self.scheduler.take_outputs()
        by_owner: dict[str, list[TokenOutput]] = defaultdict(list)
        for output in outputs:
            by_owner[output.request.owner].append(_token_output(output))
            if output.finish_reason is not None:
                _end_span(output)
        for owner, batch in by_owner.items():
            peer = self.peers_by_name.get(owner)
            if peer is not None:
                await self.router.send(peer, TokenBatch(outputs=batch))
        for failure in failures:
            await self._send_failure(failure)
        await self._send_transfers()

    async def _send_transfers(self) -> None:
        """The hand-offs' transfer commands, each under its hand-off's span (a child
        of the request's span), which ends when the hand-off settles."""
        handoffs = self.scheduler.handoffs
        started, handoffs.started = handoffs.started, []
        for transfer in started:
            request = transfer.request
            transfer.span = _tracer.start_span(
                "scheduler.handoff",
                context=set_span_in_context(request.span) if request.span else request.context,
                attributes={"gen_ai.request.id": request.request_id,
                            "meshserve.transfer.id": transfer.transfer_id,
                            "meshserve.transfer.source": transfer.source,
                            "meshserve.transfer.dest": transfer.dest,
                            "meshserve.transfer.blocks": len(transfer.dest_blocks)})
        while handoffs.commands:
            commands, handoffs.commands = handoffs.commands, []
            for c in commands:
                peer = self.peers_by_name.get(c.worker)
                span = c.transfer.span
                ctx = set_span_in_context(span) if span is not None else None
                delivered = peer is not None and await self.router.send(peer, c.command, ctx=ctx)
                if not delivered and not isinstance(c.command, KvTransferCancel):
                    # The worker never got it, so that side will not report: it settles
                    # now (a lost worker's settled already), which may queue a cancel.
                    # A lost cancel is different: the transfer still runs there and
                    # ends at its own deadline, with a report.
                    handoffs.on_done(c.worker, KvTransferDone(
                        c.transfer.transfer_id, False, error="command not delivered"))
        ended, handoffs.ended = handoffs.ended, []
        for transfer in ended:
            _end_handoff_span(transfer)

    async def _send_failure(self, failure: RequestFailure) -> None:
        peer = self.peers_by_name.get(failure.owner)
        if peer is not None:
            await self.router.send(peer, failure.failure)

    async def _pump_all(self) -> None:
        for name in list(self.scheduler.workers):
            await self._pump(name)

    async def _pump(self, name: str) -> None:
        """Keep worker ``name`` supplied with steps, then sync its KV lease."""
        peer = self.peers_by_name.get(name)
        slot = self.scheduler.workers.get(name)
        if peer is None or slot is None:
            return
        step_context: Context | None = None
        while (plan := self.scheduler.plan(name)) is not None:
            batch = slot.inflight.get(plan.step_id, [])
            self.step_log.planned(name, plan, self.scheduler.num_waiting, len(slot.running))
            now = time.monotonic()
            for request in batch:
                if request.first_scheduled_at is None:
                    request.first_scheduled_at = now
                    if request.span is not None:
                        request.span.add_event("scheduler.admitted")
            traced = [r.span for r in batch if r.span is not None and r.span.is_recording()]
            if traced:
                # A step serves many requests: it is parented by the oldest one (so
                # that request's trace holds the whole path) and linked to all.
                plan = msgspec.structs.replace(
                    plan, trace_links=[inject_context(set_span_in_context(s))[0] for s in traced]
                )
            with _tracer.start_as_current_span(
                "scheduler.step",
                context=set_span_in_context(traced[0]) if traced else None,
                links=[Link(s.get_span_context()) for s in traced],
                attributes={"meshserve.step.id": plan.step_id,
                            "meshserve.step.batch_size": len(plan.batch.request_ids)},
            ):
                step_context = otel_context.get_current()
                if not await self.router.send(peer, plan):
                    return
            await self._flush()  # requests failed at admission (too long)
        sync = slot.lease.sync_message()
        if sync is not None:
            # The sync reports what the last step allocated: it belongs to that step.
            await self.kv.send(sync, ctx=step_context)

    def _status(self) -> SchedulerStatus:
        scheduler = self.scheduler
        stats = scheduler.stats
        usages = [w.lease.usage for w in scheduler.workers.values() if w.lease.usage]
        return SchedulerStatus(
            workers=len(scheduler.workers),
            running=scheduler.num_running,
            waiting=scheduler.num_waiting,
            kv_usage=scheduler.kv_usage(),
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            kv_cached_blocks=sum(u.cached_blocks for u in usages),
            kv_evictions=sum(u.evictions for u in usages),
            fork_shared_blocks=stats.fork_shared_blocks,
            cow_block_copies=stats.cow_block_copies,
            num_swap_outs=stats.num_swap_outs,
            num_swap_ins=stats.num_swap_ins,
            swapped_out_blocks=stats.swapped_out_blocks,
            swapped_in_blocks=stats.swapped_in_blocks,
            host_kv_blocks=sum(w.host.num_blocks for w in scheduler.workers.values()),
            host_kv_used_blocks=sum(w.host.used_blocks for w in scheduler.workers.values()),
            swap_fallbacks=stats.swap_fallbacks,
            max_model_len=scheduler.max_model_len(),
            routing=scheduler.waiting.placement.mode,
            per_worker=[_worker_status(slot, stats, scheduler.handoffs.in_flight(slot.name))
                        for slot in scheduler.workers.values()],
        )

    async def _report_status(self) -> None:
        while True:
            status = self._status()
            for peer in self.router.peers_of("api"):
                await self.router.send(peer, status)
            self.runtime.ready = self.kv.connected
            await anyio.sleep(self.runtime.process.heartbeat_s)

    async def _consume_kv(self) -> None:
        async for event in self.kv.inbox:
            match event:
                case Received(body=KvLease() as lease):
                    self.scheduler.on_lease(lease)
                    await self._send_transfers()  # a hand-off may have waited for it
                    await self._pump(lease.pool_id)
                case Received(body=KvHostResize() as resize):
                    log.info("host swap pool resized", pool=resize.pool_id,
                             blocks=resize.host_num_blocks)
                    self.scheduler.resize_host(resize)
                    await self._flush()
                    await self._pump(resize.pool_id)
                case Received(body=Rejected() as rejected):
                    log.warning("kv manager rejected a message", reason=rejected.reason)
                case UpstreamJoined(restarted=True):
                    log.warning("kv manager restarted; re-opening pools")
                    for message in self.scheduler.reopen_pools():
                        await self._open_pool(message)
                case UpstreamJoined():
                    self.runtime.ready = True
                case UpstreamLost(reason=reason):
                    log.warning("kv manager unreachable", reason=reason)


def _worker_status(slot: WorkerSlot, stats: SchedulerStats, transfers: int) -> WorkerStatus:
    counters = stats.worker(slot.name)
    usage = slot.lease.usage
    return WorkerStatus(
        worker=slot.name,
        waiting=len(slot.waiting),
        running=len(slot.running),
        prefix_cache_queries=counters.prefix_cache_queries,
        prefix_cache_hits=counters.prefix_cache_hits,
        requests_placed=counters.requests_placed,
        rebalanced_in=counters.rebalanced_in,
        kv_usage=usage.used_blocks / usage.num_blocks if usage and usage.num_blocks else 0.0,
        role=slot.details.role,
        transfers_in_flight=transfers,
        transfers_completed=counters.transfers_completed,
        transfers_failed=counters.transfers_failed,
        transfer_bytes=counters.transfer_bytes,
    )


def _token_output(output: RequestOutput) -> TokenOutput:
    return TokenOutput(
        request_id=output.request.request_id,
        token_ids=pack_i32(output.token_ids),
        num_prior=output.num_prior,
        prompt_tokens=output.request.prompt_len,
        finish_reason=output.finish_reason,
        logprobs=output.logprobs,
        prompt_logprobs=output.prompt_logprobs,
    )


def _end_handoff_span(transfer: Transfer) -> None:
    span = transfer.span
    if span is None:
        return
    span.set_attribute("meshserve.transfer.bytes", transfer.bytes_moved)
    span.set_attribute("meshserve.transfer.seconds", transfer.seconds)
    if not transfer.completed:
        span.set_status(trace.StatusCode.ERROR, transfer.error or "failed")
    span.end()
    transfer.span = None


def _end_span(output: RequestOutput) -> None:
    request = output.request
    span = request.span
    if span is None:
        return
    span.set_attribute("gen_ai.usage.output_tokens", request.num_outputs)
    span.set_attribute("gen_ai.response.finish_reasons", [output.finish_reason or ""])
    span.set_attribute("meshserve.preemptions", request.num_preemptions)
    if request.first_scheduled_at is not None:
        span.set_attribute("meshserve.queue_time_s",
                           max(0.0, request.first_scheduled_at - request.arrived_at))
    if output.finish_reason == "abort":
        span.set_status(trace.StatusCode.ERROR, "aborted")
    span.end()
    request.span = None


async def main(runtime: ServiceRuntime) -> None:
    await SchedulerActor(runtime, load_config(SchedulerConfig)).run()
