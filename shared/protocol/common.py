"""Messages every socket family shares: hello/heartbeat, welcome, rejection."""

from __future__ import annotations

import msgspec


class WorkerDetails(msgspec.Struct, frozen=True):
    """What a GPU worker tells the scheduler about itself when it says hello."""

    model: str
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    device: str
    # Bytes one KV block takes (all layers, K and V): the KV manager sizes the host
    # swap pool from it. 0: unknown (no host tier).
    kv_block_bytes: int = 0
    # Where the worker's KV transfer socket listens (shared/protocol/transfer.py):
    # the address another worker sends this one blocks at. "": no transfer engine.
    transfer_addr: str = ""
    # prefill | decode | both (services/scheduler/README.md, Roles): which part of a
    # request the scheduler gives this worker.
    role: str = "both"


class Hello(msgspec.Struct, frozen=True, tag=True):
    """A replica announcing itself. Re-sent every heartbeat interval, so a singleton
    that restarted (and forgot its peers) re-learns every replica within one beat.

    ``incarnation`` is random per process start: a changed incarnation under the same
    identity means the replica restarted and lost whatever work it held.
    """

    service: str
    replica: int
    incarnation: str
    protocol: int
    pid: int
    capacity: int = 1
    ready: bool = True
    worker: WorkerDetails | None = None
    # How long the unit of work in hand has been running (a worker: the step call
    # in its thread), 0.0 when idle. The heartbeat comes from the event loop, so a
    # step that hangs while the loop keeps beating still shows here; the supervisor
    # kills a child whose busy_s passes its step_timeout_s.
    busy_s: float = 0.0


class Welcome(msgspec.Struct, frozen=True, tag=True):
    """A singleton's answer to a Hello; its incarnation lets replicas see it restart."""

    service: str
    incarnation: str


class Rejected(msgspec.Struct, frozen=True, tag=True):
    """The answer to a message that could not be decoded or was not expected."""

    reason: str
    msg_id: int = 0
