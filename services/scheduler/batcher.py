"""Continuous batching: who runs in each worker's next step. Pure, no I/O.

The actor feeds it submits, aborts, worker joins/losses, step results and KV
leases, and asks it for a ``StepPlan`` per worker; results for the tokenizers
accumulate in ``outputs`` and ``failures`` for the actor to send.

Policy, per worker step, under ``max_num_batched_tokens``:
1. running requests first, in admission order: a prefill chunk (at most
   ``max_prefill_chunk`` tokens) or one decode token;
2. then waiting requests by (priority, arrival), while there is budget, a free
   running slot and KV room for their first chunk.

When a running request needs a block and the whole pool is exhausted, the
lowest-priority, latest-admitted running request is preempted by recompute: it
stops being scheduled, and once its in-flight steps have come back its blocks are
freed and it re-enters the waiting queue with its outputs as part of its prompt.
A step in which a running request went short of blocks admits nobody: the blocks
it frees go to the running requests first (otherwise a victim could be re-admitted
onto its own cached blocks at once, and the preemption would free nothing).

Prefix caching (``enable_prefix_caching``): a request's full blocks are hashed in a
chain (shared/prefix_index.py) and committed to the pool's prefix index as
soon as their tokens are scheduled; admission looks the prompt up once in the
lease's mirror of that index and starts the request after the longest cached
prefix (whole blocks, never the last token, whose logits are needed). A hit may
read blocks that an earlier request computes in this very step: the worker writes
a step's K/V before any attention reads it. ``Submit.cache_salt`` roots the hash
chain, so requests under different salts never share a block.

Copy-on-write forks (``Submit.n > 1``): one Submit becomes the choices
``<id>-<i>``. Choice 0 (the leader) is queued and computes the prompt; the others
wait in its ``pending_forks``. When the leader's whole prompt is scheduled, each
fork takes over the leader's block table, all of it, the partial last block
included (one ref-count increment per block, done once per fork: nothing here
scans the cache), and starts at the prompt's last token, whose logits it needs
for its own first sample. Whoever is about to write into a block that another
live request holds (ref count > 1) gets a fresh block instead, and the plan tells
the worker to copy the shared one into it first (``StepPlan.copy_src/copy_dst``).
With n choices that is n - 1 copies of the prompt's last block, whatever the
prompt length; every other prompt block stays shared until the choices end.

    leader  [b0 b1 b2*]        b2* partial, ref 3     step N: prompt computed
    fork 1  [b0 b1 b2*]  ─▶  [b0 b1 c1]  copy b2 -> c1 step N+1, before compute
    fork 2  [b0 b1 b2*]  ─▶  [b0 b1 c2]  copy b2 -> c2 (leader then writes b2 alone)

Host tier (``preemption_mode = swap``, the default, whenever the worker's host pool
has room for the victim's whole table; recompute otherwise): a victim whose steps
have drained is *swapped out*. The next plan to its worker carries the copies
(``swap_out_*``: device block -> host block; done before that step computes, so its
device blocks are free for anyone at once) and the worker keeps the request
registered with an empty table. The request waits in the queue (status SWAPPED,
still bound to its worker) with its computed state; when admitted again it gets
fresh device blocks and the plan carries ``swap_in_*`` (host -> device), the new
blocks becoming its whole table; then it continues where it stopped, nothing
recomputed. Host blocks a swap-in frees are reusable only after that plan, so no
swap-out of the same plan overwrites them before they are read. The KV manager
sizes the host pool (``KvLease.usage.host_num_blocks``, ``KvHostResize``); when it
shrinks, swapped requests holding a block beyond the new size fall back to
recompute (the worker drops their state; they re-enter as new requests).
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from opentelemetry.context import Context

from services.scheduler.block_lease import BlockLease
from services.scheduler.config import SchedulerConfig
from services.scheduler.host_pool import HostPool
from shared.prefix_index import extend_block_hashes
from services.scheduler.request import FINISH_REASONS, Request, RequestStatus
from shared.protocol.common import WorkerDetails
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import RequestFailed, Submit
from shared.protocol.kv import KvHostResize, KvLease, KvPoolOpen
from shared.protocol.step import NewRequest, StepPlan, StepResult

TOMBSTONES = 65_536  # aborted ids remembered, so an abort that overtakes its Submit wins


def _choice_ids(msg: Submit) -> list[str]:
    return [msg.request_id] if msg.n <= 1 else [f"{msg.request_id}-{i}" for i in range(msg.n)]


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """New output ids of one request, for its tokenizer."""

    request: Request
    token_ids: list[int]
    num_prior: int
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class RequestFailure:
    owner: str
    failure: RequestFailed


@dataclass(frozen=True, slots=True)
class Takeover:
    """A re-sent Submit moved a request to another tokenizer replica."""

    request: Request
    previous_owner: str


@dataclass(eq=False, slots=True)
class WorkerSlot:
    name: str
    details: WorkerDetails
    lease: BlockLease
    running: dict[str, Request] = field(default_factory=dict)  # admission order
    inflight: dict[int, list[Request]] = field(default_factory=dict)  # step id -> batch
    finished: list[str] = field(default_factory=list)  # to drop at the worker next step
    host: HostPool = field(default_factory=HostPool)
    swapped: dict[str, Request] = field(default_factory=dict)  # on this worker's host tier
    # (request, device blocks, host blocks) swap-outs for the next plan
    pending_swap_out: list[tuple[Request, list[int], list[int]]] = field(default_factory=list)
    host_freed_after_plan: list[int] = field(default_factory=list)  # swapped in this plan
    host_blocks_sent: int = -1  # host pool size the worker was last told

    @property
    def max_total_len(self) -> int:
        capacity = self.details.num_kv_blocks * self.details.block_size
        return min(self.details.max_model_len, capacity)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.requests: dict[str, Request] = {}
        self.workers: dict[str, WorkerSlot] = {}
        self._waiting: list[tuple[int, int, Request]] = []  # heap; stale entries skipped
        self._num_waiting = 0
        self._arrivals = itertools.count()
        self._step_ids = itertools.count(1)
        self._tombstones: deque[str] = deque(maxlen=TOMBSTONES)
        self._tombstone_set: set[str] = set()
        self.outputs: list[RequestOutput] = []
        self.failures: list[RequestFailure] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up (vLLM counts tokens)
        self.prefix_cache_hits = 0  # of those, found cached
        self.fork_shared_blocks = 0  # blocks forks took over from their leader
        self.cow_block_copies = 0  # blocks copied because a fork wrote a shared one
        self.num_swap_outs = 0  # preemptions by swap (requests)
        self.num_swap_ins = 0
        self.swapped_out_blocks = 0
        self.swapped_in_blocks = 0
        self.swap_fallbacks = 0  # swapped requests sent to recompute by a host shrink
        self._groups: dict[str, list[Request]] = {}  # Submit id -> its choices (n > 1)

    # ----------------------------------------------------------------- requests

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return sum(len(w.running) for w in self.workers.values())

    def max_model_len(self) -> int:
        lengths = [w.max_total_len for w in self.workers.values()]
        if self.config.max_model_len:
            lengths.append(self.config.max_model_len)
        return min(lengths) if lengths else 0

    def submit(self, msg: Submit, owner: str, context: Context | None = None) -> list[Takeover]:
        """Queue a tokenized request (with ``n > 1``, its choices ``<id>-<i>``). A
        duplicate id (a re-sent request after a tokenizer failover) changes only
        who detokenizes it; the takeovers (one per live choice) are returned so the
        actor can hand the new owner each request's state."""
        existing = (self._groups[msg.request_id] if msg.request_id in self._groups
                    else [r for r in (self.requests.get(msg.request_id),) if r is not None])
        if existing:
            takeovers = []
            for request in existing:
                if request.owner != owner and not request.status.finished:
                    previous, request.owner = request.owner, owner
                    takeovers.append(Takeover(request, previous))
            return takeovers
        if msg.request_id in self._tombstone_set:
            return []
        prompt = unpack_i32(msg.prompt_token_ids)
        limit = self.max_model_len()
        error: str | None = None
        if not prompt:
            error = "the prompt is empty"
        elif limit and len(prompt) >= limit:
            error = (
                f"the prompt has {len(prompt)} tokens; this model serves at most "
                f"{limit} tokens in all (prompt and output)"
            )
        elif msg.n < 1:
            error = f"n must be at least 1, got {msg.n}"
        elif self._num_waiting >= self.config.max_waiting:
            for request_id in _choice_ids(msg):
                self.failures.append(RequestFailure(owner, RequestFailed(
                    request_id, 429, "server_busy",
                    f"the waiting queue is full ({self.config.max_waiting} requests); "
                    "retry later",
                )))
            return []
        if error is not None:
            for request_id in _choice_ids(msg):
                self.failures.append(RequestFailure(
                    owner, RequestFailed(request_id, 400, "invalid_request_error", error)
                ))
            return []
        choices = []
        for i, request_id in enumerate(_choice_ids(msg)):
            if request_id in self._tombstone_set:
                continue  # an abort overtook the Submit
            sampling = msg.sampling
            if msg.n > 1 and sampling.seed is not None and i > 0:
                sampling = msgspec.structs.replace(sampling, seed=sampling.seed + i)
            choices.append(Request(
                request_id=request_id,
                prompt_len=len(prompt),
                token_ids=array("i", prompt),
                sampling=sampling,
                detokenize=msg.detokenize,
                priority=msg.priority,
                arrival=next(self._arrivals),
                owner=owner,
                context=context,
                salt=msg.cache_salt,
                group=msg.request_id if msg.n > 1 else None,
            ))
        if not choices:
            return []
        for request in choices:
            self.requests[request.request_id] = request
        if msg.n > 1:
            self._groups[msg.request_id] = choices
        leader = choices[0]
        leader.pending_forks = choices[1:]
        for fork in leader.pending_forks:
            fork.fork_pending = True
        self._enqueue(leader)
        return []

    def knows(self, msg: Submit) -> bool:
        """Whether this Submit's id is live here (a re-sent request)."""
        return msg.request_id in self._groups or msg.request_id in self.requests

    def choices_of(self, msg: Submit) -> list[Request]:
        """The live requests a Submit became (one, or its n choices)."""
        if msg.request_id in self._groups:
            return [r for r in self._groups[msg.request_id] if not r.status.finished]
        request = self.requests.get(msg.request_id)
        return [request] if request is not None else []

    def ended_choices(self, msg: Submit) -> list[str]:
        """Choice ids of a live n > 1 request that have ended (or never started)."""
        group = self._groups.get(msg.request_id)
        if group is None:
            return []
        live = {r.request_id for r in group if not r.status.finished}
        return [rid for rid in _choice_ids(msg) if rid not in live]

    def _enqueue(self, request: Request) -> None:
        heapq.heappush(self._waiting, (request.priority, request.arrival, request))
        self._num_waiting += 1

    def _peek_waiting(self) -> Request | None:
        while self._waiting:
            request = self._waiting[0][2]
            if request.status == RequestStatus.SWAPPED or (
                    request.status == RequestStatus.WAITING and request.worker is None):
                return request
            heapq.heappop(self._waiting)  # aborted while waiting: a stale entry
        return None

    def abort(self, request_ids: list[str]) -> None:
        """Idempotent: finish these requests as aborted and free what they hold;
        ids not seen yet are remembered so their Submit is dropped."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                if request_id not in self._tombstone_set:
                    if len(self._tombstones) == self._tombstones.maxlen:
                        self._tombstone_set.discard(self._tombstones[0])
                    self._tombstones.append(request_id)
                    self._tombstone_set.add(request_id)
                continue
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            self.outputs.append(RequestOutput(request, [], request.num_outputs, "abort"))

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if (request.status in (RequestStatus.WAITING, RequestStatus.SWAPPED)
                and not request.fork_pending):
            self._num_waiting -= 1
        request.status = status
        self.requests.pop(request.request_id, None)
        slot = self.workers.get(request.worker) if request.worker else None
        if slot is not None:
            self._release(slot, request)
        if request.pending_forks:
            # It ended before its prompt was scheduled: the next live choice leads.
            forks = [f for f in request.pending_forks if not f.status.finished]
            request.pending_forks = []
            if forks:
                leader, leader.pending_forks = forks[0], forks[1:]
                leader.fork_pending = False
                self._enqueue(leader)
        if request.group is not None:
            group = self._groups.get(request.group, [])
            if all(r.status.finished for r in group):
                self._groups.pop(request.group, None)

    def _release(self, slot: WorkerSlot, request: Request) -> None:
        self._drop_host(slot, request)
        slot.running.pop(request.request_id, None)
        slot.lease.release(request.request_id, request.block_ids)
        if request.sent_to_worker:
            slot.finished.append(request.request_id)
        request.block_ids = []

    def _drop_host(self, slot: WorkerSlot, request: Request) -> None:
        """Give up the request's host blocks (and a swap-out not sent yet)."""
        slot.swapped.pop(request.request_id, None)
        if not request.host_blocks:
            return
        slot.pending_swap_out = [e for e in slot.pending_swap_out if e[0] is not request]
        slot.host.free(request.host_blocks)
        slot.lease.host_release(request.request_id)
        request.host_blocks = []

    def owned_by(self, owner: str) -> list[Request]:
        return [r for r in self.requests.values() if r.owner == owner]

    # ------------------------------------------------------------------ workers

    def add_worker(self, name: str, details: WorkerDetails) -> KvPoolOpen:
        """Register a worker; the returned message opens its KV pool."""
        lease = BlockLease(name, details.num_kv_blocks, details.block_size,
                           self.config.lease_blocks)
        self.workers[name] = WorkerSlot(name, details, lease)
        return lease.open_message({}, details.kv_block_bytes)

    def remove_worker(self, name: str) -> list[Request]:
        """A worker died: its requests go back to waiting, to be recomputed."""
        slot = self.workers.pop(name, None)
        if slot is None:
            return []
        requeued = [r for r in slot.running.values() if not r.status.finished]
        for request in requeued:
            request.reset_for_recompute()
            self._enqueue(request)
        for request in slot.swapped.values():
            # Its host blocks died with the worker; its queue entry stays valid.
            request.reset_for_recompute()
        return requeued + list(slot.swapped.values())

    def reopen_pools(self) -> list[KvPoolOpen]:
        """The KV manager restarted: tell it everything each pool holds."""
        return [
            slot.lease.open_message(
                {r.request_id: r.block_ids for r in slot.running.values()},
                slot.details.kv_block_bytes,
                {r.request_id: r.host_blocks for r in slot.swapped.values()})
            for slot in self.workers.values()
        ]

    def on_lease(self, lease: KvLease) -> None:
        slot = self.workers.get(lease.pool_id)
        if slot is not None:
            slot.lease.on_lease(lease)
            if slot.lease.usage is not None:
                self.resize_host(KvHostResize(lease.pool_id, slot.lease.usage.host_num_blocks))

    def resize_host(self, msg: KvHostResize) -> None:
        """The KV manager sized this worker's host tier. Swapped requests holding a
        block beyond a smaller size fall back to recompute."""
        slot = self.workers.get(msg.pool_id)
        if slot is None or msg.host_num_blocks == slot.host.num_blocks:
            return
        size = max(0, msg.host_num_blocks)
        for request in list(slot.swapped.values()):
            if request.host_blocks and max(request.host_blocks) >= size:
                self._drop_host(slot, request)
                # The worker drops its state; it comes back as a new request.
                slot.finished.append(request.request_id)
                request.reset_for_recompute()  # its queue entry stays valid
                self.swap_fallbacks += 1
        held = [b for r in slot.swapped.values() for b in r.host_blocks]
        slot.host.resize(size, held + slot.host_freed_after_plan)

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
                    or self._peek_waiting() is not None)

    def plan(self, name: str) -> StepPlan | None:
        """The next step for worker ``name``, or None when it has nothing to do
        or already has ``steps_in_flight`` steps outstanding."""
        slot = self.workers.get(name)
        if slot is None or not slot.lease.opened:
            return None
        if len(slot.inflight) >= self.config.steps_in_flight:
            return None
        self._finish_preemptions(slot)
        budget = self.config.max_num_batched_tokens
        batch: list[Request] = []
        num_tokens: list[int] = []
        block_owner: list[int] = []
        block_ids: list[int] = []
        new: list[NewRequest] = []
        caching = self.config.enable_prefix_caching

        copy_src: list[int] = []
        copy_dst: list[int] = []
        replace_owner: list[int] = []
        replace_index: list[int] = []
        replace_block: list[int] = []
        swap_in: list[tuple[str, list[int], list[int]]] = []  # (request, host, device)

        starved = False  # a running request went short of blocks in this step

        def schedule(request: Request, count: int, blocks: list[int],
                     copies: list[tuple[int, int, int]] | None = None) -> None:
            copies = copies or []
            index = len(batch)
            batch.append(request)
            num_tokens.append(count)
            if request.table_sent:
                for position, _src, dst in copies:
                    replace_owner.append(index)
                    replace_index.append(position)
                    replace_block.append(dst)
                sent = blocks
            else:
                # A fork's first step: the worker gets its whole table (copies
                # already in place).
                sent = request.block_ids + blocks
                request.table_sent = True
            for _, src, dst in copies:
                copy_src.append(src)
                copy_dst.append(dst)
            block_owner.extend([index] * len(sent))
            block_ids.extend(sent)
            request.block_ids.extend(blocks)
            request.num_scheduled += count
            if request.prefill_done:
                request.num_sampling += 1
                if request.pending_forks:
                    new.extend(self._fork(slot, request))
            request.inflight_steps += 1
            if caching:
                self._commit_full_blocks(slot, request)

        for request in list(slot.running.values()):
            if budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue
            if not request.prefill_done:
                count = min(len(request.prefill_ids) - request.num_scheduled, budget,
                            self.config.max_prefill_chunk)
            elif request.can_decode():
                count = 1
            else:
                continue  # its last tokens are in flight
            taken = self._blocks_for(slot, request, count)
            if taken is None:
                starved = True
                if slot.lease.pool_exhausted:
                    self._preempt_one(slot, needing=request)
                continue
            blocks, copies = taken
            schedule(request, count, blocks, copies)
            budget -= count

        while not starved and budget > 0 and len(slot.running) < self.config.max_num_seqs:
            request = self._peek_waiting()
            if request is None:
                break
            if request.status == RequestStatus.SWAPPED:
                if request.worker != name or not self._swap_in(slot, request, budget,
                                                               swap_in, schedule):
                    break  # it keeps its place (its K/V live on its own worker)
                budget -= num_tokens[-1] if batch and batch[-1] is request else 0
                continue
            if len(request.token_ids) >= slot.max_total_len:
                heapq.heappop(self._waiting)
                self._num_waiting -= 1
                self._fail_too_long(request, slot)
                continue
            hits = self._lookup(slot, request) if caching else []
            cached = len(hits) * slot.lease.block_size
            count = min(len(request.token_ids) - cached, budget, self.config.max_prefill_chunk)
            needed = slot.lease.blocks_for(cached + count) - len(hits)
            blocks = slot.lease.take(request.request_id, needed)
            if blocks is None:
                break  # no KV room: it keeps its place at the head of the queue
            heapq.heappop(self._waiting)
            self._num_waiting -= 1
            self._admit(slot, request)
            if caching:
                slot.lease.share(request.request_id, hits)
                self.prefix_cache_queries += len(request.token_ids)
                self.prefix_cache_hits += cached
            request.num_scheduled = cached
            request.table_sent = True
            new.append(NewRequest(
                request_id=request.request_id,
                token_ids=request.prefill_ids.tobytes(),
                num_output_tokens=request.num_outputs,
                sampling=request.sampling,
                num_computed_tokens=cached,
            ))
            schedule(request, count, hits + blocks)
            budget -= count

        swap_out, slot.pending_swap_out = slot.pending_swap_out, []
        if not batch and not slot.finished and not swap_out and not swap_in:
            return None
        host_num_blocks = -1
        if slot.host_blocks_sent != slot.host.num_blocks:
            host_num_blocks = slot.host_blocks_sent = slot.host.num_blocks
        slot.host.free(slot.host_freed_after_plan)
        slot.host_freed_after_plan = []
        step_id = next(self._step_ids)
        slot.inflight[step_id] = batch
        finished, slot.finished = slot.finished, []
        return StepPlan(
            step_id=step_id,
            new=new,
            request_ids=[r.request_id for r in batch],
            num_tokens=pack_i32(num_tokens),
            block_owner=pack_i32(block_owner),
            block_ids=pack_i32(block_ids),
            finished=finished,
            copy_src=pack_i32(copy_src),
            copy_dst=pack_i32(copy_dst),
            replace_owner=pack_i32(replace_owner),
            replace_index=pack_i32(replace_index),
            replace_block=pack_i32(replace_block),
            host_num_blocks=host_num_blocks,
            swap_out_requests=[r.request_id for r, _, _ in swap_out],
            swap_out_owner=pack_i32([i for i, (_, d, _) in enumerate(swap_out) for _ in d]),
            swap_out_src=pack_i32([b for _, d, _ in swap_out for b in d]),
            swap_out_dst=pack_i32([b for _, _, h in swap_out for b in h]),
            swap_in_requests=[r for r, _, _ in swap_in],
            swap_in_owner=pack_i32([i for i, (_, h, _) in enumerate(swap_in) for _ in h]),
            swap_in_src=pack_i32([b for _, h, _ in swap_in for b in h]),
            swap_in_dst=pack_i32([b for _, _, d in swap_in for b in d]),
        )

    def _swap_in(self, slot: WorkerSlot, request: Request, budget: int,
                 swap_in: list[tuple[str, list[int], list[int]]],
                 schedule: Callable[[Request, int, list[int]], None]) -> bool:
        """Bring a swapped-out request back: fresh device blocks for its table (the
        plan copies its host blocks into them) plus what its next chunk needs, and
        schedule that chunk. False (nothing changed) when the lease is short."""
        lease = slot.lease
        if not request.prefill_done:
            count = min(len(request.prefill_ids) - request.num_scheduled, budget,
                        self.config.max_prefill_chunk)
        else:
            count = 1 if request.can_decode() else 0
        table = len(request.host_blocks)
        needed = table + max(0, lease.blocks_for(request.num_scheduled + count) - table)
        blocks = lease.take(request.request_id, needed)
        if blocks is None:
            return False
        heapq.heappop(self._waiting)
        self._num_waiting -= 1
        host = request.host_blocks
        request.host_blocks = []
        slot.swapped.pop(request.request_id, None)
        slot.host_freed_after_plan.extend(host)
        lease.host_release(request.request_id)
        request.status = RequestStatus.RUNNING
        request.block_ids = blocks[:table]
        request.table_sent = True  # the swap-in sends its whole table
        slot.running[request.request_id] = request
        swap_in.append((request.request_id, host, blocks[:table]))
        self.num_swap_ins += 1
        self.swapped_in_blocks += table
        if count:
            schedule(request, count, blocks[table:])
        return True

    def _lookup(self, slot: WorkerSlot, request: Request) -> list[int]:
        """Cached blocks for the longest prefix of the request's tokens, short of
        its last token. Hashing is O(prompt) once per admission; the lookup is a
        dict probe per block, whatever the cache holds."""
        block_size = slot.lease.block_size
        usable = (len(request.token_ids) - 1) // block_size
        hashes = extend_block_hashes(request.block_hashes, request.token_ids, block_size,
                                     usable, request.salt)
        return slot.lease.lookup(hashes[:usable])

    def _commit_full_blocks(self, slot: WorkerSlot, request: Request) -> None:
        """Index the request's blocks whose tokens are all known and scheduled."""
        block_size = slot.lease.block_size
        full = min(request.num_scheduled, len(request.token_ids)) // block_size
        if full <= request.num_committed_blocks:
            return
        hashes = extend_block_hashes(request.block_hashes, request.token_ids, block_size, full,
                                     request.salt)
        for i in range(request.num_committed_blocks, full):
            slot.lease.commit(request.block_ids[i], hashes[i])
        request.num_committed_blocks = full

    def _blocks_for(self, slot: WorkerSlot, request: Request, count: int
                    ) -> tuple[list[int], list[tuple[int, int, int]]] | None:
        """Blocks to append so the next ``count`` positions have slots, and the
        copy-on-write copies (table position, shared block, its fresh copy) for
        blocks among the written ones that another request holds too. Both come
        from the lease in one take: None (and nothing changed) when it is short.
        Only the blocks this step writes are looked at."""
        lease = slot.lease
        end = request.num_scheduled + count
        needed = max(0, lease.blocks_for(end) - len(request.block_ids))
        written = range(request.num_scheduled // lease.block_size,
                        min(len(request.block_ids), lease.blocks_for(end)))
        shared = [i for i in written if lease.refs[request.block_ids[i]] > 1]
        if needed + len(shared) == 0:
            return [], []
        taken = lease.take(request.request_id, needed + len(shared))
        if taken is None:
            return None
        copies = []
        for position, fresh in zip(shared, taken[needed:], strict=True):
            src = request.block_ids[position]
            request.block_ids[position] = fresh
            lease.drop(request.request_id, src)
            copies.append((position, src, fresh))
        self.cow_block_copies += len(copies)
        return taken[:needed], copies

    def _fork(self, slot: WorkerSlot, leader: Request) -> list[NewRequest]:
        """The leader's prompt is scheduled: its pending forks take over its block
        table (every block, the partial last one included) and start at the
        prompt's last token. Their tables reach the worker with their first step."""
        forks = [f for f in leader.pending_forks if not f.status.finished]
        leader.pending_forks = []
        new = []
        for fork in forks:
            fork.fork_pending = False
            self._admit(slot, fork)
            fork.block_ids = list(leader.block_ids)
            slot.lease.share(fork.request_id, fork.block_ids)
            self.fork_shared_blocks += len(fork.block_ids)
            fork.block_hashes = list(leader.block_hashes)
            fork.num_committed_blocks = leader.num_committed_blocks
            fork.num_scheduled = len(fork.prefill_ids) - 1
            fork.table_sent = False
            new.append(NewRequest(
                request_id=fork.request_id,
                token_ids=fork.prefill_ids.tobytes(),
                num_output_tokens=fork.num_outputs,
                sampling=fork.sampling,
                num_computed_tokens=fork.num_scheduled,
            ))
        return new

    def _admit(self, slot: WorkerSlot, request: Request) -> None:
        request.status = RequestStatus.RUNNING
        request.worker = slot.name
        request.prefill_ids = array("i", request.token_ids)
        request.max_total_len = slot.max_total_len
        request.eos_token_ids = frozenset(slot.details.eos_token_ids)
        request.sent_to_worker = True
        slot.running[request.request_id] = request

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
        self.num_preemptions += 1
        self._finish_preemptions(slot)

    def _finish_preemptions(self, slot: WorkerSlot) -> None:
        for request in list(slot.running.values()):
            if request.status == RequestStatus.PREEMPTING and request.inflight_steps == 0:
                if not self._swap_out(slot, request):
                    self._release(slot, request)
                    request.reset_for_recompute()
                self._enqueue(request)

    def _swap_out(self, slot: WorkerSlot, request: Request) -> bool:
        """Preempt by swap if that is the policy and the host pool has room for the
        victim's whole table; its device blocks are free at once (the copies run
        before the next step computes)."""
        if self.config.preemption_mode != "swap" or not request.block_ids:
            return False
        host = slot.host.take(len(request.block_ids))
        if host is None:
            return False
        device = request.block_ids
        slot.running.pop(request.request_id, None)
        slot.lease.release(request.request_id, device)
        slot.lease.host_hold(request.request_id, host)
        slot.pending_swap_out.append((request, device, host))
        slot.swapped[request.request_id] = request
        request.block_ids = []
        request.host_blocks = host
        request.status = RequestStatus.SWAPPED
        request.num_preemptions += 1
        self.num_swap_outs += 1
        self.swapped_out_blocks += len(device)
        return True

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
        for request_id, token in zip(result.request_ids, token_ids, strict=True):
            request = self.requests.get(request_id)
            if request is None or request.worker != name or request.status.finished:
                continue  # finished (stop, abort) while this step was in flight
            request.num_sampling -= 1
            prior = request.num_outputs
            request.token_ids.append(token)
            if self.config.enable_prefix_caching:
                self._commit_full_blocks(slot, request)
            status = request.finish_reason_after(token)
            if status is not None:
                self._finish(request, status)
            self.outputs.append(RequestOutput(
                request, [token], prior, FINISH_REASONS.get(status) if status else None,
            ))
        self._finish_preemptions(slot)

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
