"""The waiting queue: requests waiting for a worker, by (priority, arrival). Pure.

A heap with lazy deletion: a request that leaves the queue other than from its
head (aborted while waiting) is only forgotten, and its heap entry is skipped when
it reaches the head. The queue keeps the count, so nobody else has to.
"""

from __future__ import annotations

import heapq

from services.scheduler.request import Request


class WaitingQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Request]] = []
        # Requests in the queue, by identity: a stale heap entry's request is still
        # referenced by the heap, so its id() cannot be reused meanwhile.
        self._queued: set[int] = set()

    def __len__(self) -> int:
        return len(self._queued)

    def push(self, request: Request) -> None:
        assert id(request) not in self._queued, f"{request.request_id} queued twice"
        heapq.heappush(self._heap, (request.priority, request.arrival, request))
        self._queued.add(id(request))

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
        self._queued.discard(id(request))

    def discard(self, request: Request) -> None:
        """``request`` leaves the queue wherever it is (it ended); a no-op if it is
        not queued."""
        self._queued.discard(id(request))
