"""The readiness condition (/health/ready, /health, ``runtime.ready``): the api is
not draining, a tokenizer replica is connected and the scheduler has reported at
least one worker recently. Liveness (/health/live) is only "this process answers
HTTP" and needs nothing from here."""

from __future__ import annotations

from services.api.openai_schema import HealthReport
from shared.mesh import MISSED_BEATS_DEAD
from shared.protocol.generation import SchedulerStatus


class MeshHealth:
    """What the api knows of the mesh behind it. No I/O: callers pass the clock.

    The scheduler re-sends its ``SchedulerStatus`` every heartbeat; one older than
    ``MISSED_BEATS_DEAD`` beats is as good as none (the scheduler may be gone).
    """

    def __init__(self, heartbeat_s: float) -> None:
        self.stale_after_s = heartbeat_s * MISSED_BEATS_DEAD
        self.scheduler: SchedulerStatus | None = None
        self._status_at = 0.0

    def on_scheduler_status(self, status: SchedulerStatus, now: float) -> None:
        self.scheduler = status
        self._status_at = now

    def on_scheduler_lost(self) -> None:
        self.scheduler = None

    def fresh_status(self, now: float) -> SchedulerStatus | None:
        if self.scheduler is None or now - self._status_at > self.stale_after_s:
            return None
        return self.scheduler

    def report(self, tokenizers: int, now: float, *, draining: bool = False) -> HealthReport:
        status = self.fresh_status(now)
        missing = []
        if draining:
            missing.append("the api is draining for shutdown")
        if tokenizers == 0:
            missing.append("no tokenizer replica is connected")
        if status is None:
            missing.append("no recent status from the scheduler")
        elif status.workers == 0:
            missing.append("the scheduler reports no worker")
        return HealthReport(
            status="ok" if not missing else "unavailable",
            tokenizers=tokenizers,
            scheduler_connected=status is not None,
            workers=status.workers if status is not None else 0,
            missing=missing,
        )
