"""The KV manager's state: one BlockPool per worker, driven by the wire messages.
Pure: takes decoded messages, returns the replies; the actor does the I/O."""

from __future__ import annotations

from collections import defaultdict

from services.kvcache.block_pool import BlockPool, BlockPoolError
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.kv import (
    KvBlockRow,
    KvDump,
    KvDumpRequest,
    KvLease,
    KvPoolClose,
    KvPoolOpen,
    KvStats,
    KvSync,
    KvUsage,
    unpack_i64,
)


def _grouped(requests: list[str], owner: bytes, blocks: bytes) -> dict[str, list[int]]:
    owners = unpack_i32(owner)
    block_ids = unpack_i32(blocks)
    if len(owners) != len(block_ids):
        raise BlockPoolError(f"{len(owners)} owners for {len(block_ids)} blocks")
    grouped: dict[str, list[int]] = defaultdict(list)
    for index, block in zip(owners, block_ids, strict=True):
        if not 0 <= index < len(requests):
            raise BlockPoolError(f"owner index {index} outside {len(requests)} requests")
        grouped[requests[index]].append(block)
    return grouped


class KvManager:
    def __init__(self) -> None:
        self.pools: dict[str, BlockPool] = {}
        self.block_sizes: dict[str, int] = {}

    def open_pool(self, msg: KvPoolOpen) -> KvLease:
        pool = BlockPool(msg.num_blocks)
        owned = _grouped(msg.alloc_requests, msg.alloc_owner, msg.alloc_blocks)
        pool.restore(owned, unpack_i32(msg.leased_blocks))
        self.pools[msg.pool_id] = pool
        self.block_sizes[msg.pool_id] = msg.block_size
        granted = pool.top_up(msg.lease_target)
        return self._lease(msg.pool_id, msg.seq, granted)

    def close_pool(self, msg: KvPoolClose) -> None:
        self.pools.pop(msg.pool_id, None)
        self.block_sizes.pop(msg.pool_id, None)

    def sync(self, msg: KvSync) -> KvLease:
        """Apply what the scheduler held, freed and committed, then top its lease up.

        Copy-on-write drops apply first (they refer to holds reported earlier).
        Frees apply before allocations: a request preempted and re-admitted within
        one sync interval frees its old blocks and holds new ones. Hashes apply
        after allocations: a block may be allocated and fill within one interval.
        Raises BlockPoolError (state unchanged) for an impossible report.
        """
        pool = self.pools.get(msg.pool_id)
        if pool is None:
            raise BlockPoolError(f"unknown pool {msg.pool_id!r}")
        allocations = _grouped(msg.alloc_requests, msg.alloc_owner, msg.alloc_blocks)
        commit_blocks = unpack_i32(msg.commit_blocks)
        commit_hashes = unpack_i64(msg.commit_hashes)
        if len(commit_blocks) != len(commit_hashes):
            raise BlockPoolError(f"{len(commit_blocks)} blocks for {len(commit_hashes)} hashes")
        outside = [b for b in (*commit_blocks, *unpack_i32(msg.uncache_blocks))
                   if not 0 <= b < pool.num_blocks]
        if outside:
            raise BlockPoolError(f"blocks {outside[:8]} outside a pool of {pool.num_blocks}")
        # Every check runs before anything changes. Holds are checked before the
        # frees: freeing never removes a hash, so a hold that passes here (leased,
        # held, or caching a prefix) is still possible after them.
        for request_id, blocks in allocations.items():
            pool.check_hold(request_id, blocks)
        drops = _grouped(msg.drop_requests, msg.drop_owner, msg.drop_blocks)
        for request_id, blocks in drops.items():
            for block in blocks:
                pool.check_drop(request_id, block)
        pool.uncache(unpack_i32(msg.uncache_blocks))
        # Drops before frees: a fork that copied a block and then ended drops it
        # and frees the rest of its table in one sync.
        for request_id, blocks in drops.items():
            for block in blocks:
                pool.drop(request_id, block)
        for request_id in msg.freed_requests:
            pool.free_request(request_id)
        for request_id, blocks in allocations.items():
            pool.hold(request_id, blocks, checked=True)
        for block, block_hash in zip(commit_blocks, commit_hashes, strict=True):
            pool.commit_hash(block, block_hash)
        granted = pool.top_up(msg.lease_target)
        return self._lease(msg.pool_id, msg.seq, granted)

    def _lease(self, pool_id: str, seq: int, granted: list[int]) -> KvLease:
        return KvLease(pool_id=pool_id, seq=seq, block_ids=pack_i32(granted),
                       usage=self.usage(pool_id))

    def usage(self, pool_id: str) -> KvUsage:
        u = self.pools[pool_id].usage()
        return KvUsage(pool_id=pool_id, num_blocks=u.num_blocks, used_blocks=u.used_blocks,
                       leased_blocks=u.leased_blocks, free_blocks=u.free_blocks,
                       requests=u.requests, cached_blocks=u.cached_blocks,
                       evictions=u.evictions)

    def stats(self) -> KvStats:
        return KvStats(pools=[self.usage(p) for p in sorted(self.pools)])

    def dump(self, msg: KvDumpRequest) -> KvDump:
        """The request's block table in the pool that holds it."""
        for pool_id in sorted(self.pools):
            rows = self.pools[pool_id].describe(msg.request_id)
            if rows:
                return KvDump(msg.request_id, pool_id, [
                    KvBlockRow(r.block_id, r.ref_count, r.block_hash, "device") for r in rows])
        return KvDump(msg.request_id, "", [])
