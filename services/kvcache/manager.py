"""The KV manager's state: one BlockPool per worker, driven by the wire messages.
Pure: takes decoded messages, returns the replies; the actor does the I/O.

Host tier: the KV manager sizes each worker's host swap pool, ``host_swap_gb`` over
the worker's bytes per block (``KvPoolOpen.block_bytes``), and may be told a new
size at run time (``set_host_swap``). The scheduler allocates host block ids within
that size while it plans and reports which swapped-out request holds which in its
syncs; here they are kept for ``kv stats`` (host usage) and ``kv dump`` (tier).

Scheduler restarts: every pool remembers the scheduler incarnation that opened it
(``KvPoolOpen.owner``). When another incarnation shows up (its hello, or a pool it
opens), the pools of the old one are closed: the dead scheduler's leases and its
requests' holds go back to the free pool, nothing leaks. The new scheduler re-opens
a fresh pool for every worker that says hello to it; a worker that died while no
scheduler was up is never re-opened, so its pool is not left behind either. The
prefix cache of a closed pool is not kept: the new scheduler's mirror starts empty,
and a cached block whose step the dead scheduler planned but no worker ran would
hold garbage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from services.kvcache.block_pool import BlockPool, BlockPoolError
from shared.protocol.envelope import pack_i32
from shared.protocol.kv import (
    KvBlockRow,
    KvDump,
    KvDumpRequest,
    KvHostResize,
    KvLease,
    KvPoolClose,
    KvPoolOpen,
    KvSetHostSwap,
    KvStats,
    KvSync,
    KvUsage,
)
from shared.protocol.tables import TableError, check_ids, unpack_ints

T = TypeVar("T")


def _checked(what: str, unpack: Callable[[str], T]) -> T:
    """A table of the message, or BlockPoolError (the actor's rejection) naming it."""
    try:
        return unpack(what)
    except TableError as e:
        raise BlockPoolError(str(e)) from e


def _checked_sync(pool: BlockPool, msg: KvSync) -> tuple[
        dict[str, list[int]], dict[str, list[int]], dict[str, list[int]],
        list[tuple[int, int]], list[int]]:
    """The sync's tables (holds, drops, host holds, commits, uncache), once every
    check has passed; BlockPoolError otherwise."""
    holds = _checked("holds", msg.holds.unpack)
    drops = _checked("drops", msg.drops.unpack)
    host_holds = _checked("host_holds", msg.host_holds.unpack)
    commits = _checked("commits", msg.commits.unpack)
    uncache = _checked("uncache", lambda w: unpack_ints(msg.uncache, w))
    _checked("block", lambda w: check_ids(
        [b for b, _ in commits] + uncache, pool.num_blocks, w))
    # Every check runs before anything changes. Holds are checked before the
    # frees: freeing never removes a hash, so a hold that passes here (leased,
    # held, or caching a prefix) is still possible after them.
    for request_id, blocks in holds.items():
        pool.check_hold(request_id, blocks)
    for request_id, blocks in drops.items():
        for block in blocks:
            pool.check_drop(request_id, block)
    return holds, drops, host_holds, commits, uncache


# A pool costs ~100 bytes of bookkeeping per block here: this bound (1.6 GB) is far
# above any real device's block count, and keeps a confused or hostile peer from
# making the KV manager allocate without end.
MAX_POOL_BLOCKS = 1 << 24


def host_blocks_for(host_swap_gb: float, block_bytes: int) -> int:
    """Host blocks of ``block_bytes`` in ``host_swap_gb``; past MAX_POOL_BLOCKS the
    answer is MAX_POOL_BLOCKS + 1 (too many, whatever the number: a resize refuses
    it, and no pool is ever sized from an overflowing float)."""
    if block_bytes <= 0 or not host_swap_gb > 0:
        return 0
    blocks = host_swap_gb * 1e9 / block_bytes
    if not math.isfinite(blocks) or blocks > MAX_POOL_BLOCKS:
        return MAX_POOL_BLOCKS + 1
    return int(host_swap_gb * 1e9) // block_bytes


class KvManager:
    def __init__(self, host_swap_gb: float = 1.0) -> None:
        self.pools: dict[str, BlockPool] = {}
        self.host_swap_gb = host_swap_gb
        self.block_bytes: dict[str, int] = {}
        self.host_tables: dict[str, dict[str, list[int]]] = {}  # pool -> request -> blocks
        self.owners: dict[str, str] = {}  # pool -> scheduler incarnation that opened it

    def open_pool(self, msg: KvPoolOpen) -> KvLease:
        if not 1 <= msg.num_blocks <= MAX_POOL_BLOCKS:
            raise BlockPoolError(
                f"a pool has 1..{MAX_POOL_BLOCKS} blocks, {msg.pool_id!r} asked for "
                f"{msg.num_blocks}")
        pool = BlockPool(msg.num_blocks)
        owned = _checked("holds", msg.holds.unpack)
        pool.restore(owned, _checked("leased_blocks", lambda w: unpack_ints(msg.leased_blocks, w)))
        self.reconcile(msg.owner)
        self.pools[msg.pool_id] = pool
        self.owners[msg.pool_id] = msg.owner
        self.block_bytes[msg.pool_id] = msg.block_bytes
        self.host_tables[msg.pool_id] = {}
        granted = pool.top_up(msg.lease_target)
        return self._lease(msg.pool_id, msg.seq, granted)

    def close_pool(self, msg: KvPoolClose) -> None:
        self.pools.pop(msg.pool_id, None)
        self.block_bytes.pop(msg.pool_id, None)
        self.host_tables.pop(msg.pool_id, None)
        self.owners.pop(msg.pool_id, None)

    def reconcile(self, scheduler: str) -> dict[str, int]:
        """Scheduler incarnation ``scheduler`` is the live one: close every pool an
        earlier incarnation opened. Returns, per pool closed, the blocks its dead
        scheduler held or leased (now free). Idempotent; "" reconciles nothing."""
        if not scheduler:
            return {}
        stale = [p for p, owner in self.owners.items() if owner and owner != scheduler]
        released = {}
        for pool_id in sorted(stale):
            usage = self.pools[pool_id].usage()
            released[pool_id] = usage.used_blocks + usage.leased_blocks
            self.close_pool(KvPoolClose(pool_id))
        return released

    def sync(self, msg: KvSync) -> KvLease:
        """Apply what the scheduler held, freed and committed, then top its lease up.

        The parts apply in the order of ``KvSync``'s fields. Raises BlockPoolError
        (state unchanged) for an impossible report.
        """
        pool = self.pools.get(msg.pool_id)
        if pool is None:
            raise BlockPoolError(f"unknown pool {msg.pool_id!r}")
        holds, drops, host_holds, commits, uncache = _checked_sync(pool, msg)
        # The order of KvSync's fields (see there for why).
        pool.uncache(uncache)
        for request_id, blocks in drops.items():
            for block in blocks:
                pool.drop(request_id, block)
        for request_id in msg.freed:
            pool.free_request(request_id)
        for request_id, blocks in holds.items():
            pool.hold(request_id, blocks, checked=True)
        for block, block_hash in commits:
            pool.commit_hash(block, block_hash)
        host = self.host_tables.setdefault(msg.pool_id, {})
        for request_id in msg.host_released:
            host.pop(request_id, None)
        host.update(host_holds)
        granted = pool.top_up(msg.lease_target)
        return self._lease(msg.pool_id, msg.seq, granted)

    def host_num_blocks(self, pool_id: str) -> int:
        return host_blocks_for(self.host_swap_gb, self.block_bytes.get(pool_id, 0))

    def set_host_swap(self, msg: KvSetHostSwap) -> tuple[KvStats, list[KvHostResize]]:
        """Resize every host pool; the scheduler must hear each new size (it drops
        swapped requests beyond a smaller one, which then report their release)."""
        if not (math.isfinite(msg.host_swap_gb) and msg.host_swap_gb >= 0):
            raise BlockPoolError(f"host_swap_gb must be a number >= 0, got {msg.host_swap_gb}")
        sizes = {p: host_blocks_for(msg.host_swap_gb, self.block_bytes.get(p, 0))
                 for p in sorted(self.pools)}
        if any(n > MAX_POOL_BLOCKS for n in sizes.values()):
            raise BlockPoolError(f"host_swap_gb={msg.host_swap_gb} makes a host pool of more "
                                 f"than {MAX_POOL_BLOCKS} blocks")
        self.host_swap_gb = msg.host_swap_gb
        resizes = [KvHostResize(p, n) for p, n in sizes.items()]
        for resize in resizes:
            # Forget host holdings beyond the new size now: the scheduler drops them.
            host = self.host_tables.get(resize.pool_id, {})
            for request_id in [r for r, b in host.items()
                               if b and max(b) >= resize.host_num_blocks]:
                del host[request_id]
        return self.stats(), resizes

    def _lease(self, pool_id: str, seq: int, granted: list[int]) -> KvLease:
        return KvLease(pool_id=pool_id, seq=seq, block_ids=pack_i32(granted),
                       usage=self.usage(pool_id))

    def usage(self, pool_id: str) -> KvUsage:
        u = self.pools[pool_id].usage()
        return KvUsage(pool_id=pool_id, num_blocks=u.num_blocks, used_blocks=u.used_blocks,
                       leased_blocks=u.leased_blocks, free_blocks=u.free_blocks,
                       requests=u.requests, cached_blocks=u.cached_blocks,
                       evictions=u.evictions, host_num_blocks=self.host_num_blocks(pool_id),
                       host_used_blocks=sum(len(b) for b in
                                            self.host_tables.get(pool_id, {}).values()))

    def stats(self) -> KvStats:
        return KvStats(pools=[self.usage(p) for p in sorted(self.pools)])

    def dump(self, msg: KvDumpRequest) -> KvDump:
        """The request's block table in the pool that holds it."""
        for pool_id in sorted(self.pools):
            rows = self.pools[pool_id].describe(msg.request_id)
            if rows:
                return KvDump(msg.request_id, pool_id, [
                    KvBlockRow(r.block_id, r.ref_count, r.block_hash, "device") for r in rows])
            host = self.host_tables.get(pool_id, {}).get(msg.request_id)
            if host:
                return KvDump(msg.request_id, pool_id, [
                    KvBlockRow(block, 1, None, "host") for block in host])
        return KvDump(msg.request_id, "", [])
