"""The waiting queue: requests waiting for a worker, by (priority, arrival). Pure.

A heap with lazy deletion: a request that leaves the queue other than from its
head (aborted while waiting) is only forgotten, and its heap entry is skipped when
it reaches the head. The queue keeps the count, and the tokens its requests
hold (``tokens``: what admission must prefill, the bound ``max_waiting_tokens``
applies to), so nobody else has to.
"""

from __future__ import annotations

import heapq

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

    def _forget(self, request: Request) -> None:
        self._tokens -= self._queued.pop(id(request), 0)


def queue_refusal(queue: WaitingQueue, config: SchedulerConfig,
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
