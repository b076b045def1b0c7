"""scheduler <-> kvcache: block pools, one per worker replica.

The KV manager owns the pools. So that no step waits on it, it *leases* free block
ids to the scheduler ahead of need; the scheduler allocates from its lease while it
plans, and reports what it allocated and freed in at most one ``KvSync`` per step,
whose answer (a lease top-up) arrives while the worker computes.
"""

from __future__ import annotations

import msgspec


class KvPoolOpen(msgspec.Struct, frozen=True, tag=True):
    """Open (or re-open) a worker's pool. Answered by a KvLease.

    A new worker opens an empty pool. After a KV manager restart the scheduler
    re-opens every pool with what it still holds (its allocations and its unused
    lease), so the new incarnation rebuilds the exact state instead of handing out
    blocks that are in use.
    """

    pool_id: str
    num_blocks: int
    block_size: int
    lease_target: int
    alloc_requests: list[str] = []
    alloc_owner: bytes = b""  # packed int32, index into alloc_requests
    alloc_blocks: bytes = b""  # packed int32
    leased_blocks: bytes = b""  # packed int32
    seq: int = 0  # echoed in the KvLease answer


class KvPoolClose(msgspec.Struct, frozen=True, tag=True):
    """A worker left: drop its pool and every allocation in it."""

    pool_id: str


class KvSync(msgspec.Struct, frozen=True, tag=True, gc=False):
    """What the scheduler did with its lease since the last sync.

    ``alloc_owner[j]`` indexes ``alloc_requests`` for block ``alloc_blocks[j]``.
    """

    pool_id: str
    seq: int
    alloc_requests: list[str]
    alloc_owner: bytes  # packed int32
    alloc_blocks: bytes  # packed int32
    freed_requests: list[str]
    lease_target: int


class KvUsage(msgspec.Struct, frozen=True):
    pool_id: str
    num_blocks: int
    used_blocks: int
    leased_blocks: int
    free_blocks: int
    requests: int


class KvLease(msgspec.Struct, frozen=True, tag=True, gc=False):
    """New free block ids for the scheduler's lease, and the pool's usage."""

    pool_id: str
    seq: int
    block_ids: bytes  # packed int32
    usage: KvUsage


class KvStatsRequest(msgspec.Struct, frozen=True, tag=True):
    pass


class KvStats(msgspec.Struct, frozen=True, tag=True):
    pools: list[KvUsage]
