"""The scheduler's allocator for one worker's host swap tier. Pure, no I/O.

The KV manager sizes the tier (``host_swap_gb`` over the worker's bytes per block)
and may resize it at run time; the scheduler hands its block ids out while it plans,
like the device lease, and reports holdings in the ``KvSync``. Lowest ids first, so
the worker's lazily grown host storage stays compact.
"""

from __future__ import annotations

import heapq


class HostPool:
    def __init__(self) -> None:
        self.num_blocks = 0
        self._free: list[int] = []  # heap of free ids below num_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def take(self, count: int) -> list[int] | None:
        if count > len(self._free):
            return None
        return [heapq.heappop(self._free) for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if block < self.num_blocks:  # beyond a shrink: gone already
                heapq.heappush(self._free, block)

    def resize(self, num_blocks: int, held: list[int]) -> None:
        """``num_blocks`` ids from now on; ``held`` are the ids in use (holders of
        ids beyond the new size must let them go through ``free``)."""
        taken = set(held)
        self._free = [b for b in range(num_blocks) if b not in taken]
        heapq.heapify(self._free)
        self.num_blocks = num_blocks
