"""The KV manager's state: one BlockPool per worker, driven by the wire messages.
Pure: takes decoded messages, returns the replies; the actor does the I/O."""

from __future__ import annotations

from collections import defaultdict

from services.kvcache.block_pool import BlockPool, BlockPoolError
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.kv import KvLease, KvPoolClose, KvPoolOpen, KvStats, KvSync, KvUsage


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
        """Apply what the scheduler allocated and freed, then top its lease up.

        Frees apply before allocations: a request preempted and re-admitted within
        one sync interval frees its old blocks and commits new ones.
        Raises BlockPoolError (state unchanged) for an impossible report.
        """
        pool = self.pools.get(msg.pool_id)
        if pool is None:
            raise BlockPoolError(f"unknown pool {msg.pool_id!r}")
        allocations = _grouped(msg.alloc_requests, msg.alloc_owner, msg.alloc_blocks)
        for request_id, blocks in allocations.items():
            pool.check_leased(request_id, blocks)
        for request_id in msg.freed_requests:
            pool.free_request(request_id)
        for request_id, blocks in allocations.items():
            pool.commit(request_id, blocks)
        granted = pool.top_up(msg.lease_target)
        return self._lease(msg.pool_id, msg.seq, granted)

    def _lease(self, pool_id: str, seq: int, granted: list[int]) -> KvLease:
        return KvLease(pool_id=pool_id, seq=seq, block_ids=pack_i32(granted),
                       usage=self.usage(pool_id))

    def usage(self, pool_id: str) -> KvUsage:
        u = self.pools[pool_id].usage()
        return KvUsage(pool_id=pool_id, num_blocks=u.num_blocks, used_blocks=u.used_blocks,
                       leased_blocks=u.leased_blocks, free_blocks=u.free_blocks,
                       requests=u.requests)

    def stats(self) -> KvStats:
        return KvStats(pools=[self.usage(p) for p in sorted(self.pools)])
