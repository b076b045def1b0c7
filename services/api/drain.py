"""Draining: the api stops taking requests and lets the ones in flight finish.

    SIGTERM ──▶ Drain.start ──▶ new requests: 503 shutting_down + Retry-After
                             ──▶ /health/ready: 503 (a balancer stops sending)
            ──▶ wait until no request is in flight, at most shutdown_timeout_s
            ──▶ deadline passed: what is left fails (503; a stream that started
                gets an error event and [DONE]) and is aborted in the mesh, at most
                shutdown_grace_s
            ──▶ the process ends (uvicorn closes its connections)

``Drain`` is the shared state (text and speech both refuse through it) and the
wake-up: whoever ends a flight calls ``changed``, so waiting for "nothing in
flight" is an event, not a poll.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from services.api.errors import ApiError

# What a client of a draining api is told to do: retry soon, likely on another api
# behind the same balancer (this one is going away).
DRAIN_RETRY_AFTER_S = 2


class Drain:
    """Whether the api still takes requests, and a wake-up per ended flight."""

    def __init__(self) -> None:
        self.draining = False
        self._changed = anyio.Event()

    def start(self) -> None:
        """Refuse new requests from now on. Idempotent."""
        self.draining = True
        self.changed()

    def refusal(self) -> ApiError:
        return ApiError(503, "the api is shutting down and takes no new requests; retry",
                        code="shutting_down", retry_after_s=DRAIN_RETRY_AFTER_S)

    def check_open(self) -> None:
        """Raise the 503 a new request gets while draining."""
        if self.draining:
            raise self.refusal()

    def changed(self) -> None:
        """A flight ended (or draining began): wake whoever waits in ``wait_until``."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, idle: Callable[[], bool]) -> None:
        """Return once ``idle()`` holds, re-checked at every ``changed``. Bound it
        with a deadline."""
        while not idle():
            await self._changed.wait()
