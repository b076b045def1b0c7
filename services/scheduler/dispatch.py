"""Every waiting request, on the queue of the worker it was placed on. Pure.

A new request is placed when it arrives (placement.py) and waits in that worker's
``WorkerQueue``; only that worker admits it. While no worker is up it waits
unplaced, and every worker that joins places those again (in queue order). The
admission bounds (``max_waiting``, ``max_waiting_tokens``: HTTP 429) count every
queue together, through ``len()`` and ``tokens`` here.

Bound requests: a preempted request re-enters its own worker's queue (a swapped
one must: its K/V sit in that worker's host tier; a recomputed one finds its
prefix still cached there). When a worker is lost, its queued and running
requests are placed again on the others, as new ones (their K/V died with it).

Rebalancing: placement sees only the moment of arrival; a worker may fall behind
afterwards (long decodes, a pool short of blocks). A queue is *backlogged* when
its worker's last admission pass left requests in it. A worker that plans with an
empty queue, a free running seat and a backlogged peer takes requests from the
peer with the longest queue: up to half the difference of their queues and no more
than its free seats, from the peer's tail (the ones it would admit last), never a
swapped one (bound to its host blocks). The moved requests' work is estimated
again against their new worker's cache.
"""

from __future__ import annotations

from collections.abc import Iterator

from services.scheduler.placement import Placement
from services.scheduler.request import Request, RequestStatus
from services.scheduler.roles import admitting
from services.scheduler.stats import SchedulerStats
from services.scheduler.waiting_queue import WaitingQueue
from services.scheduler.worker_slot import WorkerSlot


class Dispatcher:
    def __init__(self, placement: Placement, workers: dict[str, WorkerSlot],
                 stats: SchedulerStats) -> None:
        self.placement = placement
        self._workers = workers  # the scheduler's own dict: joins and losses show here
        self._stats = stats
        self.unplaced = WaitingQueue()

    def _queues(self) -> Iterator[WaitingQueue]:
        yield self.unplaced
        for slot in self._workers.values():
            yield slot.waiting

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues())

    @property
    def tokens(self) -> int:
        """Tokens of every waiting request, on every queue."""
        return sum(queue.tokens for queue in self._queues())

    def place(self, request: Request) -> WorkerSlot | None:
        """Queue a request that is bound to no worker on the one placement picks
        (unplaced while there is none). Returns that worker."""
        # Roles (roles.py): prefill and both workers, or any while none of those is up.
        slots = admitting(self._workers.values())
        fitting = [s for s in slots if len(request.token_ids) < s.max_total_len]
        # None fits: the worker that admits it fails it, with its own limit in the error.
        slot = self.placement.choose(request, fitting or slots)
        if slot is None:
            self.unplaced.push(request)
        else:
            self._enqueue(slot, request)
            self._stats.worker(slot.name).requests_placed += 1
        return slot

    def requeue(self, slot: WorkerSlot, request: Request) -> None:
        """A preempted request waits on its own worker again."""
        self._enqueue(slot, request)

    def _enqueue(self, slot: WorkerSlot, request: Request) -> None:
        work, hashes = self.placement.work(request, slot)
        slot.waiting.push(request, work, hashes)

    def discard(self, request: Request) -> None:
        """``request`` ended: it leaves whichever queue holds it."""
        for queue in self._queues():
            queue.discard(request)

    def on_worker_joined(self) -> None:
        """Requests that waited for any worker are placed now."""
        waiting = self.unplaced.requests()
        for request in waiting:
            self.unplaced.discard(request)
        for request in waiting:
            self.place(request)

    def on_worker_lost(self, slot: WorkerSlot, orphans: list[Request]) -> None:
        """``slot``'s worker is gone (it is out of the workers already): its queued
        requests, and ``orphans`` (its running ones, reset for recompute), are placed
        again, in arrival order. A swapped one's host blocks died with it."""
        queued = slot.waiting.requests()
        for request in queued:
            slot.waiting.discard(request)
            if request.status == RequestStatus.SWAPPED:
                request.reset_for_recompute()
        for request in sorted(orphans + queued, key=lambda r: (r.priority, r.arrival)):
            self.place(request)

    def stealable(self, slot: WorkerSlot) -> bool:
        """Whether ``slot`` (its queue empty) would take requests from a peer now."""
        return (not len(slot.waiting) and self._donor(slot) is not None
                and slot in admitting(self._workers.values()))

    def _donor(self, slot: WorkerSlot) -> WorkerSlot | None:
        peers = [p for p in self._workers.values()
                 if p is not slot and p.backlogged and len(p.waiting) > 1]
        return max(peers, key=lambda p: (len(p.waiting), p.name), default=None)

    def rebalance(self, slot: WorkerSlot, free_seats: int) -> int:
        """``slot`` is about to admit: with an empty queue and free seats, it takes
        requests from the most backlogged peer. Returns how many moved."""
        if len(slot.waiting) or free_seats <= 0 or slot not in admitting(self._workers.values()):
            return 0  # a decode worker takes no new requests, from a peer neither
        donor = self._donor(slot)
        if donor is None:
            return 0
        movable = [r for r in donor.waiting.requests() if r.status != RequestStatus.SWAPPED]
        count = min(len(donor.waiting) // 2, free_seats, len(movable))
        moved = movable[len(movable) - count:] if count else []
        for request in moved:
            donor.waiting.discard(request)
            self._enqueue(slot, request)
        self._stats.worker(slot.name).rebalanced_in += len(moved)
        return len(moved)
