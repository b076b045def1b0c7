"""The waiting queue: requests waiting for a worker, by (priority, arrival). Pure.

A heap with lazy deletion: a request that leaves the queue other than from its
head (aborted while waiting) is only forgotten, and its heap entry is skipped when
it reaches the head. The queue keeps the count, and the tokens its requests
hold (``tokens``: what admission must prefill, the bound ``max_waiting_tokens``
applies to), so nobody else has to.

Each worker has its own queue (``WorkerQueue``: what placement needs to know of it
too); requests wait in a plain ``WaitingQueue`` only while no worker is up.
dispatch.py holds them all and applies the bounds over all of them.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Protocol

from services.scheduler.config import SchedulerConfig
from services.scheduler.request import Request

BUSY = 429, "server_busy"


class WaitingQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Request]] = []
        # Requests in the queue, by identity, with the tokens each held when it was
        # queued (a waiting request's tokens do not change): a stale heap entry's
        # request is still referenced by the heap, so its id() cannot be reused
        # meanwhile.
        self._queued: dict[int, int] = {}
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def tokens(self) -> int:
        """Tokens of every queued request (prompt, plus outputs of a preempted one)."""
        return self._tokens

    def push(self, request: Request) -> None:
        assert id(request) not in self._queued, f"{request.request_id} queued twice"
        heapq.heappush(self._heap, (request.priority, request.arrival, request))
        self._queued[id(request)] = len(request.token_ids)
        self._tokens += len(request.token_ids)

    def peek(self) -> Request | None:
        """The first request in line, or None."""
        while self._heap:
            request = self._heap[0][2]
            if id(request) in self._queued:
                return request
            heapq.heappop(self._heap)  # left the queue while waiting: a stale entry
        return None

    def pop(self, request: Request) -> None:
        """``request``, the one ``peek`` returned, leaves the queue (admitted, or
        failed at admission)."""
        assert self.peek() is request, "only the head of the queue is popped"
        heapq.heappop(self._heap)
        self._forget(request)

    def discard(self, request: Request) -> None:
        """``request`` leaves the queue wherever it is (it ended); a no-op if it is
        not queued."""
        self._forget(request)

    def requests(self) -> list[Request]:
        """The queued requests in queue order (a copy)."""
        live = {id(entry[2]): entry for entry in self._heap if id(entry[2]) in self._queued}
        return [entry[2] for entry in sorted(live.values(), key=lambda e: e[:2])]

    def _forget(self, request: Request) -> None:
        self._tokens -= self._queued.pop(id(request), 0)


class WorkerQueue(WaitingQueue):
    """One worker's queue, with what placement reads of it: the work its requests
    will cost that worker (``work``: tokens to compute, estimated when each was
    queued: its tokens less the prefix it found), and the block hashes of their
    prompts (``queued_prefix``), so a burst of requests sharing a prefix follows the
    first one before any of them is computed (the prefix index only learns of a
    block once it is scheduled)."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: dict[int, tuple[int, list[int]]] = {}  # id -> (work, hashes)
        self._hashes: Counter[int] = Counter()
        self._work = 0

    @property
    def work(self) -> int:
        return self._work

    def push(self, request: Request, work: int | None = None,
             hashes: list[int] | None = None) -> None:
        super().push(request)
        work = len(request.token_ids) if work is None else work
        self._entries[id(request)] = (work, list(hashes or []))
        self._hashes.update(hashes or [])
        self._work += work

    @property
    def queued_blocks(self) -> int:
        """Distinct prompt blocks its queued requests hold (by hash)."""
        return len(self._hashes)

    def queued_prefix(self, hashes: list[int]) -> int:
        """Blocks of the longest prefix of this hash chain a queued request shares."""
        count = 0
        for block_hash in hashes:
            if not self._hashes[block_hash]:
                break
            count += 1
        return count

    def _forget(self, request: Request) -> None:
        super()._forget(request)
        work, hashes = self._entries.pop(id(request), (0, []))
        self._work -= work
        self._hashes.subtract(hashes)
        for block_hash in hashes:
            if self._hashes.get(block_hash, 0) <= 0:
                self._hashes.pop(block_hash, None)


class QueueBounds(Protocol):
    """What the admission bounds read: the requests waiting and their tokens."""

    def __len__(self) -> int: ...

    @property
    def tokens(self) -> int: ...


def queue_refusal(queue: QueueBounds, config: SchedulerConfig,
                  prompt_len: int) -> tuple[int, str, str] | None:
    """(HTTP status, error type, message) when ``queue`` has no room for a new
    request of ``prompt_len`` tokens: ``max_waiting`` requests, or its prompt would
    take the queue past ``max_waiting_tokens``. An empty queue takes any prompt
    (the model's length bound is checked before this): a prompt longer than the
    token bound would otherwise be refused forever, and a retry could never help.
    """
    if len(queue) >= config.max_waiting:
        return *BUSY, (f"the waiting queue is full ({config.max_waiting} requests); "
                       "retry later")
    if len(queue) and queue.tokens + prompt_len > config.max_waiting_tokens:
        return *BUSY, (f"the waiting queue holds {queue.tokens} prompt tokens; "
                       f"{prompt_len} more would pass max_waiting_tokens="
                       f"{config.max_waiting_tokens}; retry later")
    return None
