"""One worker's paged KV block pool: who holds which block. Pure, no I/O.

Every block is in exactly one of three places:

    free ──lease()──▶ leased (held by the scheduler, unassigned)
      ▲                  │ commit(request, blocks)
      └──free_request()── owned[request]

Free blocks sit in an O(1) deque. A finished request's blocks go back tail first,
so the blocks holding a prompt's beginning are the last to be handed out again
(the order prefix caching wants once blocks keep their contents).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


class BlockPoolError(ValueError):
    """The scheduler reported something impossible (a block it does not hold)."""


@dataclass(frozen=True, slots=True)
class PoolUsage:
    num_blocks: int
    used_blocks: int
    leased_blocks: int
    free_blocks: int
    requests: int


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._leased: set[int] = set()
        self._owned: dict[str, list[int]] = {}

    def lease(self, count: int) -> list[int]:
        """Up to ``count`` free blocks, now leased (fewer when the pool runs low)."""
        granted = [self._free.popleft() for _ in range(min(count, len(self._free)))]
        self._leased.update(granted)
        return granted

    def top_up(self, target: int) -> list[int]:
        """Lease enough new blocks that ``target`` are leased in all."""
        return self.lease(max(0, target - len(self._leased)))

    def check_leased(self, request_id: str, blocks: Iterable[int]) -> None:
        missing = [b for b in blocks if b not in self._leased]
        if missing:
            raise BlockPoolError(f"{request_id}: blocks {missing[:8]} are not leased")

    def commit(self, request_id: str, blocks: Iterable[int]) -> None:
        """Leased blocks now belong to ``request_id`` (appended to its table)."""
        blocks = list(blocks)
        self.check_leased(request_id, blocks)
        self._leased.difference_update(blocks)
        self._owned.setdefault(request_id, []).extend(blocks)

    def free_request(self, request_id: str) -> int:
        """Return a request's blocks to the free list; unknown ids free nothing
        (frees are idempotent). Returns how many blocks were freed."""
        blocks = self._owned.pop(request_id, None)
        if not blocks:
            return 0
        self._free.extend(reversed(blocks))
        return len(blocks)

    def restore(self, owned: dict[str, list[int]], leased: Iterable[int]) -> None:
        """Rebuild state another incarnation held (after a KV manager restart)."""
        taken: set[int] = set(leased)
        for request_id, blocks in owned.items():
            overlap = taken.intersection(blocks)
            if overlap:
                raise BlockPoolError(f"{request_id}: blocks {sorted(overlap)[:8]} held twice")
            taken.update(blocks)
        out_of_range = [b for b in taken if not 0 <= b < self.num_blocks]
        if out_of_range:
            raise BlockPoolError(f"blocks {out_of_range[:8]} outside a pool of {self.num_blocks}")
        self._leased = set(leased)
        self._owned = {r: list(b) for r, b in owned.items() if b}
        self._free = deque(b for b in range(self.num_blocks) if b not in taken)

    def blocks_of(self, request_id: str) -> list[int]:
        return list(self._owned.get(request_id, ()))

    def usage(self) -> PoolUsage:
        used = self.num_blocks - len(self._free) - len(self._leased)
        return PoolUsage(
            num_blocks=self.num_blocks,
            used_blocks=used,
            leased_blocks=len(self._leased),
            free_blocks=len(self._free),
            requests=len(self._owned),
        )
