"""Continuous batching: who runs in each worker's next step. Pure, no I/O.

The actor feeds it submits, aborts, worker joins/losses, step results and KV leases,
and asks it for a ``StepPlan`` per worker; results for the tokenizers accumulate in
``outputs`` and ``failures`` for the actor to send. Its parts:

    waiting_queue.py  WaitingQueue: heap by priority, lazy deletion, its own counts;
                      queue_refusal: max_waiting and max_waiting_tokens (HTTP 429)
    placement.py      Placement: which worker a new request waits for (routing)
    dispatch.py       every worker's queue: placing, requeueing, rebalancing
    worker_slot.py    WorkerSlot: one worker's lease, host tier, running requests
    step_builder.py   StepBuilder: one step's lists, packed into the StepPlan
    forks.py          n > 1: choices, copy-on-write forks of the leader's table
    roles.py, handoff.py  prefill/decode roles; a prefilled request's K/V handed off
    host_swap.py      preemption by swap to the worker's host tier
    block_lease.py    the KV lease and prefix-index mirror of one worker's pool
    block_tables.py   a request's table on that lease: growth, copy-on-write, prefixes
    stats.py, outcomes.py  the counters; RequestOutput, RequestFailure, SubmitResult

Policy, per worker step, under ``max_num_batched_tokens``:
1. running requests first, in admission order: a prefill chunk (at most
   ``max_prefill_chunk`` tokens) or one decode token;
2. then the requests waiting in that worker's own queue by (priority, arrival),
   while there is budget, a free running slot and KV room for their first chunk
   (an idle worker first takes some of a backlogged peer's: dispatch.py).

When a running request needs a block and the whole pool is exhausted, the
lowest-priority, latest-admitted running request is preempted: it stops being
scheduled, and once its in-flight steps have come back it is swapped out to the
worker's host tier (``preemption_mode = swap``, the default, when the host pool
has room; see host_swap.py) or its blocks are freed and it re-enters the waiting
queue with its outputs as part of its prompt (recompute). A step in which a
running request went short of blocks admits nobody: the blocks it frees go to the
running requests first (otherwise a victim could be re-admitted onto its own
cached blocks at once, and the preemption would free nothing). Prefix caching and
copy-on-write: block_tables.py.
"""

from __future__ import annotations

import itertools
from array import array

from opentelemetry.context import Context

from services.scheduler import block_tables, forks, handoff, host_swap, submission
from services.scheduler.block_lease import BlockLease
from services.scheduler.config import SchedulerConfig
from services.scheduler.dispatch import Dispatcher
from services.scheduler.logprobs import hold_prompt_logprobs
from services.scheduler.outcomes import RequestFailure, RequestOutput, SubmitResult, Takeover
from services.scheduler.placement import Placement
from services.scheduler.request import FINISH_REASONS, Request, RequestStatus
from services.scheduler.stats import SchedulerStats
from services.scheduler.step_builder import StepBuilder
from services.scheduler.worker_slot import WorkerSlot, lease_target, steps_ahead
from shared.protocol.choices import choice_ids, choice_sampling
from shared.protocol.common import WorkerDetails
from shared.protocol.envelope import unpack_i32
from shared.protocol.generation import RequestFailed, Submit
from shared.protocol.kv import KvHostResize, KvLease, KvPoolOpen
from shared.protocol.logprobs import Logprobs
from shared.protocol.step import StepPlan, StepResult
from shared.recent_ids import RecentIds


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.requests: dict[str, Request] = {}
        self.workers: dict[str, WorkerSlot] = {}
        self.stats = SchedulerStats()
        self.waiting = Dispatcher(Placement.from_config(config), self.workers, self.stats)
        self.handoffs = handoff.Handoffs(self.workers, self.waiting, self.stats,
                                         config.handoff_timeout_s, config.max_num_seqs)
        self.outputs: list[RequestOutput] = []
        self.failures: list[RequestFailure] = []
        # Tombstones: an abort that overtakes its Submit wins.
        self._aborted: RecentIds[str] = RecentIds(65_536)
        self._groups = forks.ChoiceGroups()
        self._arrivals = itertools.count()
        self._step_ids = itertools.count(1)

    # ----------------------------------------------------------------- requests

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(len(w.running) for w in self.workers.values())

    def max_model_len(self) -> int:
        lengths = [w.max_total_len for w in self.workers.values()]
        if self.config.max_model_len:
            lengths.append(self.config.max_model_len)
        return min(lengths) if lengths else 0

    def submit(self, msg: Submit, owner: str, context: Context | None = None) -> SubmitResult:
        """Queue a tokenized request (with ``n > 1``, its choices ``<id>-<i>``). A
        duplicate id (a re-sent request after a tokenizer failover) changes only
        who detokenizes it. A refused one fails (``failures``) with the reason."""
        existing = self._live_choices(msg)
        if existing:
            return self._take_over(msg, existing, owner)
        if msg.request_id in self._aborted:
            return SubmitResult()
        refusal = submission.refusal(msg, self.max_model_len(), self.waiting, self.config)
        if refusal is not None:
            self.failures.extend(RequestFailure(owner, RequestFailed(request_id, *refusal))
                                 for request_id in choice_ids(msg.request_id, msg.n))
            return SubmitResult()
        tokens, prompt_len = submission.tokens(msg)  # a resumption: prompt + outputs
        choices = [
            Request(
                request_id=request_id,
                prompt_len=prompt_len,
                token_ids=array("i", tokens),
                sampling=choice_sampling(msg.sampling, i),
                detokenize=msg.detokenize,
                priority=msg.priority,
                arrival=next(self._arrivals),
                owner=owner,
                context=context,
                salt=msg.cache_salt,
                group=msg.request_id if msg.n > 1 else None,
            )
            for i, request_id in enumerate(choice_ids(msg.request_id, msg.n))
            if request_id not in self._aborted  # an abort overtook the Submit
        ]
        if not choices:
            return SubmitResult()
        for request in choices:
            self.requests[request.request_id] = request
        if msg.n > 1:
            self._groups.add(msg.request_id, choices)
        self.waiting.place(choices[0])
        return SubmitResult(queued=choices)

    def _live_choices(self, msg: Submit) -> list[Request]:
        if msg.request_id in self._groups:
            return self._groups.get(msg.request_id)
        # Also the choices of an n > 1 request resumed one by one (scheduler restart).
        ids = choice_ids(msg.request_id, max(msg.n, 1))
        return [r for r in map(self.requests.get, ids) if r is not None]

    def _take_over(self, msg: Submit, existing: list[Request], owner: str) -> SubmitResult:
        takeovers = []
        for request in existing:
            if request.owner != owner and not request.status.finished:
                previous, request.owner = request.owner, owner
                takeovers.append(Takeover(request, previous))
        live = {r.request_id for r in existing if not r.status.finished}
        ended = [rid for rid in choice_ids(msg.request_id, msg.n) if rid not in live]
        return SubmitResult(takeovers=takeovers, ended=ended if msg.n > 1 else [])

    def abort(self, request_ids: list[str]) -> None:
        """Idempotent: finish these requests as aborted and free what they hold;
        ids not seen yet are remembered so their Submit is dropped."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                self._aborted.add(request_id)
                continue
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            self.outputs.append(RequestOutput(request, [], request.num_outputs, "abort"))

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.waiting.discard(request)
        self.handoffs.on_finished(request)
        request.status = status
        self.requests.pop(request.request_id, None)
        slot = self.workers.get(request.worker) if request.worker else None
        if slot is not None:
            self._release(slot, request)
        leader = self._groups.on_finished(request)
        if leader is not None:
            self.waiting.place(leader)

    def _release(self, slot: WorkerSlot, request: Request) -> None:
        host_swap.drop_host(slot, request)
        slot.running.pop(request.request_id, None)
        slot.lease.release(request.request_id, request.block_ids)
        if request.sent_to_worker:
            slot.finished.append(request.request_id)
        request.block_ids = []

    # ------------------------------------------------------------------ workers

    def add_worker(self, name: str, details: WorkerDetails) -> KvPoolOpen:
        """Register a worker; the returned message opens its KV pool."""
        target = lease_target(self.config.lease_blocks, steps_ahead(
            self.config.steps_in_flight, details), self.config.max_num_batched_tokens, details)
        lease = BlockLease(name, details.num_kv_blocks, details.block_size, target)
        self.workers[name] = WorkerSlot(name, details, lease)
        self.waiting.on_worker_joined()
        return lease.open_message({}, details.kv_block_bytes)

    def remove_worker(self, name: str) -> list[Request]:
        """A worker died (or was scaled away): its running and swapped requests are
        recomputed, and they and its queue are placed on the other workers."""
        slot = self.workers.pop(name, None)
        if slot is None:
            return []
        self.handoffs.on_worker_lost(name)
        requeued = [r for r in slot.running.values() if not r.status.finished]
        for request in requeued:
            request.reset_for_recompute()
        swapped = list(slot.swapped.values())  # reset with the queue they are in
        self.waiting.on_worker_lost(slot, requeued)
        return requeued + swapped

    def reopen_pools(self) -> list[KvPoolOpen]:
        """The KV manager restarted: tell it everything each pool holds (hand-offs too)."""
        return [
            slot.lease.open_message(
                {r.request_id: r.block_ids for r in slot.running.values()}
                | self.handoffs.held(slot.name),
                slot.details.kv_block_bytes,
                {r.request_id: r.host_blocks for r in slot.swapped.values()})
            for slot in self.workers.values()
        ]

    def on_lease(self, lease: KvLease) -> None:
        slot = self.workers.get(lease.pool_id)
        if slot is not None:
            slot.lease.on_lease(lease)
            self.handoffs.start_ready()  # one may have waited for this lease
            if slot.lease.usage is not None:
                self.resize_host(KvHostResize(lease.pool_id, slot.lease.usage.host_num_blocks))

    def resize_host(self, msg: KvHostResize) -> None:
        slot = self.workers.get(msg.pool_id)
        if slot is not None and msg.host_num_blocks != slot.host.num_blocks:
            host_swap.resize_host(slot, msg.host_num_blocks, self.stats)

    def kv_usage(self) -> float:
        used = total = 0
        for slot in self.workers.values():
            if slot.lease.usage is not None:
                used += slot.lease.usage.used_blocks
                total += slot.lease.usage.num_blocks
        return used / total if total else 0.0

    # ----------------------------------------------------------------- planning

    def has_work(self, name: str) -> bool:
        slot = self.workers.get(name)
        if slot is None:
            return False
        return bool(slot.finished or slot.running or slot.pending_swap_out
                    or len(slot.waiting) or self.waiting.stealable(slot))

    def plan(self, name: str) -> StepPlan | None:
        """The next step for worker ``name``, or None when it has nothing to do
        or already has ``steps_in_flight`` steps outstanding."""
        slot = self.workers.get(name)
        if slot is None or not slot.lease.opened:
            return None
        if len(slot.inflight) >= steps_ahead(self.config.steps_in_flight, slot.details):
            return None
        self._finish_preemptions(slot)
        builder = StepBuilder()
        handoff.register_arrivals(slot, builder)
        budget = self.config.max_num_batched_tokens
        starved, budget = self._schedule_running(slot, builder, budget)
        if not starved:
            self._admit_waiting(slot, builder, budget)
        slot.note_prefill_owed()
        swap_out, slot.pending_swap_out = slot.pending_swap_out, []
        if not builder.has_work() and not slot.finished and not swap_out:
            return None
        host_num_blocks = slot.host_num_blocks_news()
        slot.host.free(slot.host_freed_after_plan)
        slot.host_freed_after_plan = []
        step_id = next(self._step_ids)
        slot.inflight[step_id] = builder.batch
        finished, slot.finished = slot.finished, []
        return builder.build(step_id, finished, swap_out, host_num_blocks)

    def _next_count(self, request: Request, budget: int) -> int:
        """Tokens ``request`` computes next: a prefill chunk, 1 decode token, or 0
        (its last tokens are in flight)."""
        if not request.prefill_done:
            return min(len(request.prefill_ids) - request.num_scheduled, budget,
                       self.config.max_prefill_chunk)
        return 1 if request.can_decode() else 0

    def _schedule_running(self, slot: WorkerSlot, builder: StepBuilder,
                          budget: int) -> tuple[bool, int]:
        """Running requests first, in admission order. Returns whether one went
        short of blocks (then nobody is admitted), and the budget left."""
        starved = False
        for request in list(slot.running.values()):
            if budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue
            count = self._next_count(request, budget)
            if not count:
                continue
            taken = block_tables.grow(slot.lease, request, count)
            if taken is None:
                starved = True
                if slot.lease.pool_exhausted:
                    self._preempt_one(slot, needing=request)
                continue
            blocks, copies = taken
            self.stats.cow_block_copies += len(copies)
            self._schedule(slot, builder, request, count, blocks, copies)
            budget -= count
        return starved, budget

    def _admit_waiting(self, slot: WorkerSlot, builder: StepBuilder, budget: int) -> None:
        """The worker's waiting requests by (priority, arrival), while there is room.
        The head of the queue that does not fit keeps its place."""
        self.waiting.rebalance(slot, self.config.max_num_seqs - len(slot.running))
        self._admit_queue(slot, builder, budget)
        slot.backlogged = len(slot.waiting) > 0

    def _admit_queue(self, slot: WorkerSlot, builder: StepBuilder, budget: int) -> None:
        while budget > 0 and len(slot.running) < self.config.max_num_seqs:
            request = slot.waiting.peek()
            if request is None:
                return
            if request.status == RequestStatus.SWAPPED:
                # Its K/V live on its own worker: only that one may take it back.
                count = self._swap_in(slot, builder, request, budget)
                if count is None:
                    return
                budget -= count
                continue
            if len(request.token_ids) >= slot.max_total_len:
                slot.waiting.pop(request)
                self._fail_too_long(request, slot)
                continue
            count = self._admit(slot, builder, request, budget)
            if count is None:
                return  # no KV room
            budget -= count

    def _swap_in(self, slot: WorkerSlot, builder: StepBuilder, request: Request,
                 budget: int) -> int | None:
        """Tokens the swapped-in request computes in this step; None when it stays
        in the queue (the lease is short)."""
        count = self._next_count(request, budget)
        blocks = host_swap.swap_in(slot, request, count, builder, self.stats)
        if blocks is None:
            return None
        slot.waiting.pop(request)
        if count:
            self._schedule(slot, builder, request, count, blocks, [])
        return count

    def _admit(self, slot: WorkerSlot, builder: StepBuilder, request: Request,
               budget: int) -> int | None:
        """Start a waiting request after its longest cached prefix; the tokens it
        computes in this step, or None (nothing changed) when the lease is short."""
        caching = self.config.enable_prefix_caching
        hits = block_tables.lookup(slot.lease, request) if caching else []
        cached = len(hits) * slot.lease.block_size
        count = min(len(request.token_ids) - cached, budget, self.config.max_prefill_chunk)
        blocks = slot.lease.take(request.request_id,
                                 slot.lease.blocks_for(cached + count) - len(hits))
        if blocks is None:
            return None
        slot.waiting.pop(request)
        slot.admit(request)
        if caching:
            slot.lease.share(request.request_id, hits)
            counters = self.stats.worker(slot.name)
            for stats in (self.stats, counters):
                stats.prefix_cache_queries += len(request.token_ids)
                stats.prefix_cache_hits += cached
        request.num_scheduled = cached
        request.table_sent = True
        builder.register(request, cached)
        self._schedule(slot, builder, request, count, hits + blocks, [])
        return count

    def _schedule(self, slot: WorkerSlot, builder: StepBuilder, request: Request, count: int,
                  blocks: list[int], copies: list[tuple[int, int, int]]) -> None:
        """``request`` computes ``count`` more tokens in this step, its table grown
        by ``blocks``."""
        builder.schedule(request, count, blocks, copies)
        request.block_ids.extend(blocks)
        request.num_scheduled += count
        if request.prefill_done:
            request.num_sampling += 1
            if request.pending_forks:
                for choice in forks.fork(slot, request, self.stats):
                    builder.register(choice, choice.num_scheduled)
        request.inflight_steps += 1
        if self.config.enable_prefix_caching:
            block_tables.commit_full_blocks(slot.lease, request)

    def _fail_too_long(self, request: Request, slot: WorkerSlot) -> None:
        request.status = RequestStatus.FINISHED_ABORTED
        self.requests.pop(request.request_id, None)
        self.failures.append(RequestFailure(request.owner, RequestFailed(
            request.request_id, 400, "invalid_request_error",
            f"the request has {len(request.token_ids)} tokens; worker {slot.name} serves at "
            f"most {slot.max_total_len}",
        )))

    def _preempt_one(self, slot: WorkerSlot, needing: Request) -> None:
        """Mark the lowest-priority, latest-admitted running request as a victim."""
        candidates = [r for r in slot.running.values() if r.status == RequestStatus.RUNNING]
        if not candidates:
            return
        victim = max(candidates, key=lambda r: (r.priority, r.arrival))
        if victim is needing and len(candidates) == 1:
            return  # alone and still short: wait for blocks other workers free
        victim.status = RequestStatus.PREEMPTING
        self.stats.num_preemptions += 1
        self._finish_preemptions(slot)

    def _finish_preemptions(self, slot: WorkerSlot) -> None:
        """Victims whose steps have drained: swapped out, or back to waiting to be
        recomputed."""
        swap = self.config.preemption_mode == "swap"
        for request in list(slot.running.values()):
            if request.status == RequestStatus.PREEMPTING and request.inflight_steps == 0:
                if not (swap and host_swap.swap_out(slot, request, self.stats)):
                    self._release(slot, request)
                    request.reset_for_recompute()
                self.waiting.requeue(slot, request)

    # ------------------------------------------------------------------ results

    def on_result(self, name: str, result: StepResult) -> None:
        slot = self.workers.get(name)
        if slot is None:
            return
        batch = slot.inflight.pop(result.step_id, None)
        if batch is None:
            return  # a step from before this worker's restart
        for request in batch:
            request.inflight_steps -= 1
        if result.error is not None:
            self._fail_step(slot, batch, result.error)
            return
        token_ids = unpack_i32(result.token_ids)
        if len(token_ids) != len(result.request_ids):
            self._fail_step(slot, batch, "step result with mismatched arrays")
            return
        hold_prompt_logprobs(self.requests, result)
        logprobs = dict(result.logprobs)
        for k, (request_id, token) in enumerate(zip(result.request_ids, token_ids, strict=True)):
            request = self.requests.get(request_id)
            if request is None or request.worker != name or request.status.finished:
                continue  # finished (stop, abort) while this step was in flight
            self._on_token(slot, request, token, logprobs.get(k))
        self._finish_preemptions(slot)
        self.handoffs.start_ready()

    def _on_token(self, slot: WorkerSlot, request: Request, token: int,
                  logprobs: Logprobs | None) -> None:
        request.num_sampling -= 1
        prior = request.num_outputs
        prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, []
        if request.sampling.max_tokens == 0:  # echo only: the prompt computed, no output
            self._finish(request, RequestStatus.FINISHED_LENGTH)
            self.outputs.append(RequestOutput(request, [], prior, "length", [], prompt_logprobs))
            return
        request.token_ids.append(token)
        if self.config.enable_prefix_caching:
            block_tables.commit_full_blocks(slot.lease, request)
        status = request.finish_reason_after(token)
        if status is not None:
            self._finish(request, status)
        elif request.hands_off:
            self.handoffs.on_prefilled(request)
        self.outputs.append(RequestOutput(
            request, [token], prior, FINISH_REASONS.get(status) if status else None,
            [logprobs] if logprobs is not None else [], prompt_logprobs,
        ))

    def _fail_step(self, slot: WorkerSlot, batch: list[Request], error: str) -> None:
        # The step's K/V were never written: no block it was to fill may stay in
        # the prefix cache, and a request that shares one (a hit in a later step)
        # would read garbage, so it fails too.
        spoiled = {b for request in batch for b in request.block_ids}
        if spoiled:
            slot.lease.uncache(sorted(spoiled))
            batch = batch + [r for r in slot.running.values()
                             if r not in batch and spoiled.intersection(r.block_ids)]
        for request in batch:
            if request.status.finished:
                continue
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            self.failures.append(RequestFailure(request.owner, RequestFailed(
                request.request_id, 500, "server_error", f"worker {slot.name} failed: {error}",
            )))

    def take_outputs(self) -> tuple[list[RequestOutput], list[RequestFailure]]:
        outputs, self.outputs = self.outputs, []
        failures, self.failures = self.failures, []
        return outputs, failures
