"""What the supervisor knows about each child process; pure, clock passed in.

A child is one replica of one service. Its record outlives its processes: a
restart replaces the pid and resets the hello bookkeeping, but keeps the replica
id and the restart count.

Health (DESIGN.md): a child is healthy when it said ``Hello(ready=True)`` within
the last three heartbeats. It is *dead* when it said hello before and then went
silent for three beats, or never said hello within ``hello_timeout_s`` of its
start (a process wedged in its imports looks alive to ``waitpid`` forever), or
its heartbeat says one unit of work (a worker's step) has run past the step
timeout: its event loop beats, but the work it holds makes no progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from shared.config import MISSED_BEATS_DEAD
from shared.protocol.control import ChildStatus


class ChildState(StrEnum):
    STARTING = "starting"  # process started, no ready hello yet
    RUNNING = "running"  # said hello with ready=True at least once
    BACKOFF = "backoff"  # crashed, waiting to be started again
    STOPPED = "stopped"  # stopped on purpose (scale down, shutdown)
    FAILED = "failed"  # its service exceeded the restart intensity


@dataclass(slots=True)
class Child:
    """One replica of one service, across its restarts."""

    service: str
    replica: int
    state: ChildState = ChildState.STARTING
    pid: int | None = None
    started_at: float | None = None
    restarts: int = 0
    first_hello_at: float | None = None
    last_hello_at: float | None = None
    ready: bool = False
    busy_s: float = 0.0  # as of the last hello: how long its work in hand has run
    healthy_since: float | None = None
    # Why the current process is going away, set before it is signalled, so the
    # exit is not mistaken for a crash.
    stopping: bool = False
    restarting: bool = False

    @property
    def name(self) -> str:
        return f"{self.service}/{self.replica}"

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def spawned(self, pid: int, now: float) -> None:
        self.pid = pid
        self.started_at = now
        self.state = ChildState.STARTING
        self.first_hello_at = None
        self.last_hello_at = None
        self.ready = False
        self.busy_s = 0.0
        self.healthy_since = None
        self.restarting = False

    def heard(self, ready: bool, at: float, busy_s: float = 0.0) -> None:
        """A hello from the current process (matched by pid) was seen at ``at``."""
        if not self.alive:
            return
        if self.first_hello_at is None:
            self.first_hello_at = at
        self.last_hello_at = at if self.last_hello_at is None else max(self.last_hello_at, at)
        self.ready = ready
        self.busy_s = busy_s
        if ready and self.state is ChildState.STARTING:
            self.state = ChildState.RUNNING

    def exited(self) -> None:
        self.pid = None
        self.ready = False
        self.healthy_since = None

    def healthy(self, now: float, heartbeat_s: float) -> bool:
        return (
            self.alive
            and self.ready
            and self.last_hello_at is not None
            and now - self.last_hello_at <= heartbeat_s * MISSED_BEATS_DEAD
        )

    def update_health(self, now: float, heartbeat_s: float) -> float:
        """Track since when the child has been healthy; returns for how long (0 if not)."""
        if not self.healthy(now, heartbeat_s):
            self.healthy_since = None
            return 0.0
        if self.healthy_since is None:
            self.healthy_since = now
        return now - self.healthy_since

    def liveness_problem(
        self, now: float, heartbeat_s: float, hello_timeout_s: float,
        step_timeout_s: float = 0.0,
    ) -> str | None:
        """Why this live process must be killed, or None while it is fine
        (``step_timeout_s`` 0: no limit on one unit of work)."""
        if not self.alive or self.stopping or self.started_at is None:
            return None
        if self.last_hello_at is None:
            if now - self.started_at > hello_timeout_s:
                return f"no hello within {hello_timeout_s:g} s of its start"
            return None
        silent_s = now - self.last_hello_at
        if silent_s > heartbeat_s * MISSED_BEATS_DEAD:
            return f"missed heartbeats (silent for {silent_s:.1f} s)"
        if step_timeout_s > 0 and self.busy_s > step_timeout_s:
            return (f"no progress: one step has run {self.busy_s:.1f} s "
                    f"(step_timeout_s={step_timeout_s:g})")
        return None

    def status(self, now: float, heartbeat_s: float) -> ChildStatus:
        return ChildStatus(
            service=self.service,
            replica=self.replica,
            pid=self.pid,
            state=str(self.state),
            healthy=self.healthy(now, heartbeat_s),
            restarts=self.restarts,
            uptime_s=round(now - self.started_at, 3)
            if self.alive and self.started_at is not None
            else 0.0,
        )
