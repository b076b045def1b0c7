"""Prefill/decode hand-off: a request's K/V move from the prefill worker that
computed its prompt to a decode worker, which then runs the rest. Pure, no I/O:
the actor sends ``commands`` and feeds back each worker's ``KvTransferDone``.

    prefill worker P                 scheduler                      decode worker D
    last prompt chunk, first token ─▶ not finished, hands_off:
                                      D = placement's choice among decode workers
                                      D's lease: as many blocks as its table holds
                                      request TRANSFERRING (runs on neither)
                  ◀─ KvTransferOut(id, D's transfer_addr, its blocks)
                                      KvTransferIn(id, D's blocks) ─▶
                  ── K/V, worker to worker (services/worker/kv_transfer) ──▶
    KvTransferDone(id, ok) ─────────▶ ◀──────────────── KvTransferDone(id, ok)
                                      both sides settled:
                                      P's blocks released (the prefix cache keeps
                                      the full ones); on D like a full prefix hit:
                                      table = D's blocks, num_computed_tokens = all
                                      but the last token, which D computes next

A side *settles* with its own Done, or when its worker is lost (its pool went with
it). The transfer ends once both sides settled, not at the receiver's ok: until the
sender's Done its blocks may still be read, and keeping the request off every
worker until then means no lease ever holds two generations of one request id.
The sender's Done follows the receiver's by one credit message.

Failure (a Done not ok, either worker lost, an abort): the other side is cancelled
at once (its Done follows promptly: the engine answers a cancel, and both sides
have their own deadline, ``handoff_timeout_s``). When both sides settled, the
destination blocks are freed, the source blocks released, and the request is
placed again to be recomputed with its outputs so far, like a recompute preemption;
it is then marked ``handoff_failed`` and decodes wherever it is recomputed.

A request ready to hand off while no decode worker is up (or none has a transfer
socket, or fits it) decodes on its prefill worker. While every decode worker's
running seats (``max_num_seqs``, hand-offs on their way counted) are taken, or the
chosen one's lease is short, it waits without decoding (retried at each result and
each lease grant).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from opentelemetry.trace import Span

from services.scheduler import roles
from services.scheduler.dispatch import Dispatcher
from services.scheduler.request import Request, RequestStatus
from services.scheduler.stats import SchedulerStats
from services.scheduler.step_builder import StepBuilder
from services.scheduler.worker_slot import WorkerSlot
from shared.protocol.transfer import (
    KvTransferCancel,
    KvTransferDone,
    KvTransferIn,
    KvTransferOut,
    TransferCommand,
)


@dataclass(eq=False, slots=True)
class Transfer:
    """One hand-off in flight: ``request``'s blocks on ``source`` to ``dest``."""

    transfer_id: str
    request: Request
    source: str
    dest: str
    source_blocks: list[int]
    dest_blocks: list[int]
    # Per side (worker name): None while it has not settled, else whether it was ok.
    settled: dict[str, bool | None] = field(default_factory=dict)
    error: str = ""  # why it failed; "" while nothing went wrong
    bytes_moved: int = 0  # the receiver's count
    seconds: float = 0.0  # the receiver's
    span: Span | None = None  # the actor's span of this hand-off
    completed: bool = False  # settled with the request running on the decode worker

    @property
    def done(self) -> bool:
        return all(ok is not None for ok in self.settled.values())

    @property
    def succeeded(self) -> bool:
        return not self.error and self.settled.get(self.dest) is True


@dataclass(frozen=True, slots=True)
class Command:
    """A transfer command for the actor to send to ``worker``."""

    worker: str
    command: TransferCommand
    transfer: Transfer


class Handoffs:
    def __init__(self, workers: dict[str, WorkerSlot], waiting: Dispatcher,
                 stats: SchedulerStats, timeout_s: float = 30.0,
                 max_num_seqs: int = 256) -> None:
        self._workers = workers  # the scheduler's own dict: joins and losses show here
        self._waiting = waiting
        self._stats = stats
        self.timeout_s = timeout_s
        self.max_num_seqs = max_num_seqs
        self.live: dict[str, Transfer] = {}  # by transfer id
        self._by_request: dict[str, Transfer] = {}
        self._ready: dict[str, Request] = {}  # prefilled, waiting for a destination
        self._ids = itertools.count(1)
        # For the actor: commands to send, transfers just started and just ended.
        self.commands: list[Command] = []
        self.started: list[Transfer] = []
        self.ended: list[Transfer] = []

    def in_flight(self, worker: str) -> int:
        return sum(worker in t.settled for t in self.live.values())

    def _arriving(self, worker: str) -> int:
        return sum(t.dest == worker for t in self.live.values())

    def held(self, worker: str) -> dict[str, list[int]]:
        """The blocks live hand-offs hold in ``worker``'s pool, by request (a new KV
        manager must hear of them: the sender still reads its blocks, the receiver
        writes its own)."""
        held = {}
        for t in self.live.values():
            if t.source == worker:
                held[t.request.request_id] = t.source_blocks
            elif t.dest == worker:
                held[t.request.request_id] = t.dest_blocks
        return held

    # ------------------------------------------------------------- starting

    def on_prefilled(self, request: Request) -> None:
        """``request`` (``hands_off``) has its prompt computed and its first token
        seen, and did not finish: hand it off as soon as a decode worker has room."""
        self._ready[request.request_id] = request

    def start_ready(self) -> None:
        for request_id, request in list(self._ready.items()):
            if self._start(request) is not False:
                del self._ready[request_id]

    def _start(self, request: Request) -> bool | None:
        """True: handed off; None: not any more (it ended, was reset to be recomputed,
        which prefills it again, or no decode worker is up: it decodes where it is);
        False: try again later (the destination's lease is short, or it was preempted
        by swap meanwhile and waits to be swapped back in)."""
        if request.status.finished or request.status == RequestStatus.WAITING:
            return None
        if not request.hands_off:
            return None
        source = self._workers.get(request.worker or "")
        if (source is None or request.status != RequestStatus.RUNNING
                or not request.prefill_done or request.num_sampling or request.inflight_steps):
            return False
        dests = [s for s in self._workers.values()
                 if s is not source and roles.decodes(s) and s.details.transfer_addr
                 and len(request.token_ids) < s.max_total_len]
        if not dests:
            request.hands_off = False
            return None
        # A running seat there, counting the hand-offs on their way to it.
        seated = [d for d in dests if len(d.running) + self._arriving(d.name) < self.max_num_seqs]
        dest = self._waiting.placement.choose(request, seated)
        if dest is None:
            return False
        dest_blocks = dest.lease.take(request.request_id, len(request.block_ids))
        if dest_blocks is None:
            return False
        transfer = Transfer(f"{request.request_id}@{next(self._ids)}", request, source.name,
                            dest.name, request.block_ids, dest_blocks,
                            {source.name: None, dest.name: None})
        # Off the prefill worker: it drops its state in its next plan; the blocks
        # stay held (unwritten: nobody else writes a held block) until the transfer
        # settles.
        source.running.pop(request.request_id, None)
        source.finished.append(request.request_id)
        request.status = RequestStatus.TRANSFERRING
        request.worker = None
        request.block_ids = []
        self.live[transfer.transfer_id] = transfer
        self._by_request[request.request_id] = transfer
        self.started.append(transfer)
        # The receiver first: expecting the id before the begin arrives lets the
        # sender's first chunks go without waiting for credit.
        self.commands.append(Command(dest.name, KvTransferIn.of(
            transfer.transfer_id, dest_blocks, self.timeout_s), transfer))
        self.commands.append(Command(source.name, KvTransferOut.of(
            transfer.transfer_id, dest.details.transfer_addr, transfer.source_blocks,
            self.timeout_s), transfer))
        return True

    # ------------------------------------------------------------- reports

    def on_done(self, worker: str, done: KvTransferDone) -> bool:
        """One side's report; False when it names no live transfer of that worker
        (a late report after a loss, or a stray one)."""
        transfer = self.live.get(done.transfer_id)
        if transfer is None or transfer.settled.get(worker, True) is not None:
            return False
        self._stats.worker(worker).transfer_bytes += done.bytes
        if worker == transfer.dest:
            transfer.bytes_moved, transfer.seconds = done.bytes, done.seconds
        transfer.settled[worker] = done.ok
        if not done.ok:
            side = "receiver" if worker == transfer.dest else "sender"
            self._fail(transfer, f"{side} {worker}: {done.error or done.state}")
        self._settle_if_done(transfer)
        return True

    def on_worker_lost(self, worker: str) -> None:
        """``worker`` is gone (already out of the workers): its side of every transfer
        settles (its blocks died with its pool)."""
        self._ready = {k: r for k, r in self._ready.items() if r.worker != worker}
        for transfer in list(self.live.values()):
            if worker in transfer.settled and transfer.settled[worker] is None:
                transfer.settled[worker] = False
                # Lost after every block arrived: the decode side still has them all.
                if not (worker == transfer.source and transfer.settled[transfer.dest]):
                    self._fail(transfer, f"worker {worker} was lost")
                self._settle_if_done(transfer)

    def on_finished(self, request: Request) -> None:
        """``request`` ended (an abort) while it was waiting to hand off or moving."""
        self._ready.pop(request.request_id, None)
        transfer = self._by_request.get(request.request_id)
        if transfer is not None:
            self._fail(transfer, "the request ended")

    def _fail(self, transfer: Transfer, error: str) -> None:
        if transfer.error:
            return
        transfer.error = error
        for worker, ok in transfer.settled.items():
            if ok is None:  # still running there: stop it, its Done settles it
                self.commands.append(Command(worker, KvTransferCancel(transfer.transfer_id),
                                             transfer))

    # ------------------------------------------------------------- settling

    def _settle_if_done(self, transfer: Transfer) -> None:
        if not transfer.done:
            return
        del self.live[transfer.transfer_id]
        request = transfer.request
        self._by_request.pop(request.request_id, None)
        source = self._workers.get(transfer.source)
        if source is not None:
            source.lease.release(request.request_id, transfer.source_blocks)
        dest = self._workers.get(transfer.dest)
        ok = transfer.succeeded and dest is not None and not request.status.finished
        transfer.completed = ok
        if not ok and not transfer.error:
            transfer.error = "the decode worker is gone" if dest is None else "the request ended"
        for worker in transfer.settled:
            counters = self._stats.worker(worker)
            if ok:
                counters.transfers_completed += 1
            else:
                counters.transfers_failed += 1
        if ok and dest is not None:
            _arrive(dest, request, transfer.dest_blocks)
        else:
            if dest is not None:
                dest.lease.release(request.request_id, transfer.dest_blocks)
            if not request.status.finished:
                request.reset_for_recompute()
                request.handoff_failed = True
                self._waiting.place(request)
        self.ended.append(transfer)


def _arrive(slot: WorkerSlot, request: Request, blocks: list[int]) -> None:
    """``request`` runs on ``slot`` over the blocks that arrived, like a full prefix
    hit: every token but the last has its K/V there; the last (its latest output) is
    what it computes next, and its logits give the next output."""
    slot.admit(request)
    request.hands_off = False
    request.block_ids = list(blocks)
    request.num_scheduled = len(request.token_ids) - 1
    request.num_sampling = 0
    request.inflight_steps = 0
    # The decode worker's prefix index learns these blocks as their tokens are
    # scheduled (its next commit): later requests there may hit them.
    request.num_committed_blocks = 0
    request.table_sent = False  # its first step sends the whole table
    slot.arrivals.append(request)


def register_arrivals(slot: WorkerSlot, builder: StepBuilder) -> None:
    """The worker learns of the requests that arrived since its last plan (before
    any of them is scheduled or preempted in this plan)."""
    arrivals, slot.arrivals = slot.arrivals, []
    for request in arrivals:
        if slot.running.get(request.request_id) is request:  # not ended meanwhile
            builder.register(request, request.num_scheduled)
