"""Configuration: one msgspec Struct per service, filled from MESHSERVE_* env vars
and then from flags (flags win). ``meshserve config`` prints the effective values.

Addresses are handed out by whoever starts the mesh (the supervisor locally,
compose.yaml in containers); a service never guesses one.
"""

from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

PREFIX = "MESHSERVE_"

# A peer that missed this many heartbeats (``ProcessConfig.heartbeat_s`` apart) is
# dead: the mesh endpoints reap it, the supervisor kills it, a container
# healthcheck fails. One number, so all three agree on when a peer is gone.
MISSED_BEATS_DEAD = 3

T = TypeVar("T", bound=msgspec.Struct)


class MeshAddresses(msgspec.Struct, frozen=True):
    """Where the singletons bind. ipc:// locally, tcp:// in containers."""

    supervisor_addr: str = ""  # empty: not supervised (compose, tests)
    api_addr: str = "ipc:///tmp/meshserve/api.sock"
    scheduler_addr: str = "ipc:///tmp/meshserve/scheduler.sock"
    kvcache_addr: str = "ipc:///tmp/meshserve/kvcache.sock"
    speech_addr: str = "ipc:///tmp/meshserve/speech.sock"  # api binds; tts replicas connect


class ProcessConfig(msgspec.Struct, frozen=True):
    """Settings every service process reads."""

    replica: int = 0
    # Under `docker compose --scale` every container of a service gets the same
    # environment; with this set, the replica id comes from the container's
    # hostname, which is unique and survives a container restart.
    replica_from_hostname: bool = False
    heartbeat_s: float = 0.5
    log_level: str = "info"
    # Written every heartbeat with the service's readiness; container healthchecks
    # read it (`python -m shared.healthcheck`). Empty: not written.
    health_file: str = ""
    # The mesh's CURVE keys (shared/curve.py): binding sockets serve with them and
    # admit only the mesh's client key; connecting ones present it. Empty: every
    # socket is plaintext (a service started alone, for tests). `meshserve up`
    # sets it to <run dir>/keys, compose to its secrets.
    curve_dir: str = ""
    # Profile the whole process with cProfile and write <service>-<replica>.pstats
    # here on exit. Empty: no profiling.
    profile_dir: str = ""

    def replica_id(self) -> int:
        if not self.replica_from_hostname:
            return self.replica
        return replica_from_hostname(socket.gethostname())


def replica_from_hostname(hostname: str) -> int:
    """A replica id from a container's hostname: a compose container's id or a
    Kubernetes pod's name (``worker-7d9f8c6b5d-x2k9p``), both unique among the
    running replicas and kept across a restart of the container. All 32 bits of the
    CRC: two names collide with odds of one in 4.3 billion per pair (64 pods: about
    one in ten million), where a replica id is also its ZMQ identity."""
    return zlib.crc32(hostname.encode())


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def load_config(
    cls: type[T],
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from env vars named MESHSERVE_<FIELD>, then ``overrides``.

    Values from the environment are strings; msgspec converts them to each field's
    type (``"2"`` -> 2, ``"true"`` -> True) and names the field when it cannot.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        name = env_name(field.encode_name)
        if name in environ:
            values[field.encode_name] = environ[name]
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid {cls.__name__} setting: {e}") from e


def as_env(config: msgspec.Struct) -> dict[str, str]:
    """The env vars that reproduce ``config`` in a child process."""
    out: dict[str, str] = {}
    for field in msgspec.structs.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        out[env_name(field.encode_name)] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return out
