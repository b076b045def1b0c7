"""supervisor <-> its zygote (the fork server that preloads torch and the services).

The two ends are a ``socketpair(AF_UNIX, SOCK_SEQPACKET)`` the supervisor creates and
the zygote inherits: private to the pair (no path, nothing else can connect), so it
carries no envelope or CURVE, and one packet is one message. ``Forked`` carries the
child's pidfd as SCM_RIGHTS ancillary data: the supervisor signals the child through
it, so a recycled pid can never be hit.

Schema evolution: new fields get defaults and go last; never reorder.
"""

from __future__ import annotations

import msgspec

# One packet is one message; a child's environment is the largest part.
MAX_PACKET = 1 << 20


class ForkRequest(msgspec.Struct, frozen=True, tag="fork"):
    """Start ``python -m <module> <args...>`` with exactly ``env`` (and ``cwd``)."""

    request_id: int
    module: str
    args: list[str]
    env: dict[str, str]
    cwd: str | None = None


class ZygoteReady(msgspec.Struct, frozen=True, tag="ready"):
    """Preloading is done; the zygote takes fork requests from now on."""

    pid: int
    preloaded: list[str]
    preload_s: float


class Forked(msgspec.Struct, frozen=True, tag="forked"):
    """The child runs (its pidfd travels with this packet)."""

    request_id: int
    pid: int


class ForkFailed(msgspec.Struct, frozen=True, tag="fork_failed"):
    """No child was started; the supervisor spawns one the plain way."""

    request_id: int
    error: str


class ChildExited(msgspec.Struct, frozen=True, tag="exited"):
    """A forked child was reaped. ``returncode`` as asyncio reports it (-N: signal N)."""

    pid: int
    returncode: int


ZygoteReport = ZygoteReady | Forked | ForkFailed | ChildExited
