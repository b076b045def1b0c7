"""scheduler <-> kvcache: block pools, one per worker replica.

The KV manager owns the pools. So that no step waits on it, it *leases* free block
ids to the scheduler ahead of need; the scheduler allocates from its lease while it
plans, and reports what it allocated and freed in at most one ``KvSync`` per step,
whose answer (a lease top-up) arrives while the worker computes.

Prefix caching rides on the same exchange. The scheduler keeps a mirror of each
pool's prefix index (it commits every hash, and every block in a lease grant has
lost its hash), so it looks prefixes up at admission without a round trip; what it
did is reported in the next ``KvSync``: blocks a request holds (allocated from the
lease or shared), hashes of blocks that filled, hashes to forget. The KV manager
stays the authority: it decides which blocks to lease, i.e. which cached prefixes
to evict (least recently freed first).

Schema evolution: new fields go last, with defaults; a breaking change bumps
``PROTOCOL_VERSION`` (shared/protocol/envelope.py).
"""

from __future__ import annotations

import msgspec

from shared.protocol.tables import BlockHashes, RequestBlocks


class KvPoolOpen(msgspec.Struct, frozen=True, tag=True):
    """Open (or re-open) a worker's pool. Answered by a KvLease.

    A new worker opens an empty pool. After a KV manager restart the scheduler
    re-opens every pool with what it still holds (its requests' blocks and its
    unused lease), so the new incarnation rebuilds the exact state instead of
    handing out blocks that are in use.
    """

    pool_id: str
    num_blocks: int
    block_size: int
    lease_target: int
    holds: RequestBlocks = RequestBlocks()  # every live request's whole table
    leased_blocks: bytes = b""  # packed int32
    seq: int = 0  # echoed in the KvLease answer
    block_bytes: int = 0  # one block's bytes at the worker: sizes the host pool
    # The scheduler incarnation that opens the pool. Pools opened by another one
    # belong to a scheduler that died: the KV manager closes them (their leases and
    # holds go back to the free pool) before opening this one. "": no reconciling.
    owner: str = ""


class KvPoolClose(msgspec.Struct, frozen=True, tag=True):
    """A worker left: drop its pool and every allocation in it."""

    pool_id: str


class KvSync(msgspec.Struct, frozen=True, tag=True, gc=False):
    """What the scheduler did with its lease since the last sync. The KV manager
    checks it whole (an impossible report changes nothing), then applies its fields
    in this order:

    1. ``uncache``: forget these blocks' hashes (the step that was to write them
       failed);
    2. ``drops``: copy-on-write, each request no longer holds these blocks (it holds
       a fresh copy instead, reported in ``holds``); before the frees, since a fork
       may copy a block and end within one interval;
    3. ``freed``: these requests gave up every block they held;
    4. ``holds``: each request now holds these blocks too: leased blocks it
       allocated, or blocks caching a prefix (a hit; held by others, or free);
       after the frees, since a request preempted and re-admitted within one
       interval frees its old blocks and holds new ones;
    5. ``commits``: these blocks now cache these chained hashes; after the holds,
       since a block may be allocated and fill within one interval;
    6. ``host_released``: these requests gave up their host blocks (swapped in,
       ended, or dropped by a shrink);
    7. ``host_holds``: requests swapped out, and the host blocks each now holds;
    8. ``lease_target``: top the lease up to this many free blocks.
    """

    pool_id: str
    seq: int
    uncache: bytes = b""  # packed int32
    drops: RequestBlocks = RequestBlocks()
    freed: list[str] = []
    holds: RequestBlocks = RequestBlocks()
    commits: BlockHashes = BlockHashes()
    host_released: list[str] = []
    host_holds: RequestBlocks = RequestBlocks()
    lease_target: int = 0


class KvUsage(msgspec.Struct, frozen=True):
    pool_id: str
    num_blocks: int
    used_blocks: int
    leased_blocks: int
    free_blocks: int
    requests: int
    cached_blocks: int = 0  # free blocks still caching a prefix
    evictions: int = 0  # cached prefixes overwritten
    host_num_blocks: int = 0  # the host swap pool, sized by host_swap_gb
    host_used_blocks: int = 0  # held by swapped-out requests


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


class KvSetHostSwap(msgspec.Struct, frozen=True, tag=True):
    """Resize every host swap pool at run time (``meshserve kv set host-swap-gb``).
    Answered by KvStats; the scheduler hears a KvHostResize per pool."""

    host_swap_gb: float


class KvHostResize(msgspec.Struct, frozen=True, tag=True):
    """KV manager -> scheduler: a pool's host tier now has ``host_num_blocks``
    blocks (ids 0..n-1). Swapped requests holding a block beyond it fall back to
    recompute."""

    pool_id: str
    host_num_blocks: int


class KvDumpRequest(msgspec.Struct, frozen=True, tag=True):
    """Ask for one request's blocks in every pool (``meshserve kv dump``)."""

    request_id: str


class KvBlockRow(msgspec.Struct, frozen=True, array_like=True):
    block_id: int
    ref_count: int
    block_hash: int | None
    tier: str  # "device" or "host" (a swapped-out request's blocks)


class KvDump(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    pool_id: str  # "" when no pool holds the request
    blocks: list[KvBlockRow]

