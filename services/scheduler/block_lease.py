"""The scheduler's side of one worker's KV pool: free blocks leased ahead from the
KV manager, and what was done with them since the last sync. Pure, no I/O.

Planning takes blocks from the lease synchronously; the KV manager hears about it
in the next ``KvSync`` (at most one in flight), whose answer tops the lease up
while the worker computes. Planning therefore never waits on the KV manager.
"""

from __future__ import annotations

from collections import deque

from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.kv import KvLease, KvPoolOpen, KvSync, KvUsage


class BlockLease:
    def __init__(self, pool_id: str, num_blocks: int, block_size: int, target: int) -> None:
        self.pool_id = pool_id
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.target = min(target, num_blocks)
        self._free: deque[int] = deque()
        # Allocations not yet reported, per request, in allocation order.
        self._unreported: dict[str, list[int]] = {}
        self._freed: list[str] = []
        self._seq = 0
        self.sync_in_flight = False
        self.opened = False  # the KV manager granted the first lease
        self.usage: KvUsage | None = None

    @property
    def available(self) -> int:
        return len(self._free)

    @property
    def pool_exhausted(self) -> bool:
        """No block is free here or at the KV manager: waiting will not help,
        only preemption frees room."""
        return not self._free and not self.sync_in_flight and (
            self.usage is not None and self.usage.free_blocks == 0
        )

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def take(self, request_id: str, count: int) -> list[int] | None:
        """``count`` blocks for ``request_id``, or None (and nothing taken)."""
        if count > len(self._free):
            return None
        taken = [self._free.popleft() for _ in range(count)]
        if taken:
            self._unreported.setdefault(request_id, []).extend(taken)
        return taken

    def release(self, request_id: str, blocks: list[int]) -> None:
        """A request gave up ``blocks`` (all it held). Blocks the KV manager has not
        heard of go straight back to the lease; the rest are reported freed."""
        unreported = self._unreported.pop(request_id, [])
        self._free.extendleft(unreported)
        if len(blocks) > len(unreported):
            self._freed.append(request_id)

    def sync_message(self) -> KvSync | None:
        """The next sync, if one is due and none is in flight."""
        if self.sync_in_flight or not self.opened:
            return None
        if not self._unreported and not self._freed and len(self._free) >= self.target // 2:
            return None
        requests = list(self._unreported)
        owner: list[int] = []
        blocks: list[int] = []
        for index, request_id in enumerate(requests):
            allocated = self._unreported[request_id]
            owner.extend([index] * len(allocated))
            blocks.extend(allocated)
        self._seq += 1
        message = KvSync(
            pool_id=self.pool_id,
            seq=self._seq,
            alloc_requests=requests,
            alloc_owner=pack_i32(owner),
            alloc_blocks=pack_i32(blocks),
            freed_requests=self._freed,
            lease_target=self.target,
        )
        self._unreported = {}
        self._freed = []
        self.sync_in_flight = True
        return message

    def on_lease(self, lease: KvLease) -> None:
        if lease.seq != self._seq:
            # The answer to a sync sent before a re-open (KV manager restart): its
            # blocks belong to the old incarnation's view; the re-open's answer counts.
            return
        self._free.extend(unpack_i32(lease.block_ids))
        self.usage = lease.usage
        self.sync_in_flight = False
        self.opened = True

    def open_message(self, held: dict[str, list[int]]) -> KvPoolOpen:
        """Open the pool at a (possibly new) KV manager with everything held now:
        ``held`` maps each live request to its whole block table."""
        requests = [r for r, b in held.items() if b]
        owner: list[int] = []
        blocks: list[int] = []
        for index, request_id in enumerate(requests):
            owner.extend([index] * len(held[request_id]))
            blocks.extend(held[request_id])
        self._unreported = {}
        self._freed = []
        self.sync_in_flight = True
        self._seq += 1
        return KvPoolOpen(
            pool_id=self.pool_id,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            lease_target=self.target,
            alloc_requests=requests,
            alloc_owner=pack_i32(owner),
            alloc_blocks=pack_i32(blocks),
            leased_blocks=pack_i32(self._free),
            seq=self._seq,
        )
