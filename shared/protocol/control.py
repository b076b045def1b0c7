"""supervisor <-> CLI: the control socket behind `meshserve status|restart|scale|down`.

Children also say Hello to the supervisor (see common.py); that is how it knows a
child is up and healthy, not just alive.
"""

from __future__ import annotations

import msgspec


class ChildStatus(msgspec.Struct, frozen=True):
    service: str
    replica: int
    pid: int | None
    state: str  # "starting" | "running" | "backoff" | "stopped" | "failed"
    healthy: bool
    restarts: int
    uptime_s: float


class ZygoteStatus(msgspec.Struct, frozen=True):
    """The supervisor's zygote (services/supervisor/zygote.py), which forks the
    Python services from one process that imported torch and them once."""

    pid: int | None  # None: not running (starting, between restarts, or given up)
    state: str  # "starting" | "ready" | "given-up" (children start by plain spawn)
    restarts: int


class StatusRequest(msgspec.Struct, frozen=True, tag=True):
    pass


class MeshStatus(msgspec.Struct, frozen=True, tag=True):
    supervisor_pid: int
    api_url: str
    model: str
    healthy: bool
    children: list[ChildStatus]
    zygote: ZygoteStatus | None = None  # None: this mesh runs no zygote


class RestartRequest(msgspec.Struct, frozen=True, tag=True):
    service: str
    replica: int | None = None  # None: every replica of the service


class ScaleRequest(msgspec.Struct, frozen=True, tag=True):
    service: str
    replicas: int


class ShutdownRequest(msgspec.Struct, frozen=True, tag=True):
    pass


class ControlReply(msgspec.Struct, frozen=True, tag=True):
    ok: bool
    message: str
