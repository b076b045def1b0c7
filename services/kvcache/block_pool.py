"""One worker's paged KV block pool and its prefix index. Pure, no I/O.

Every block is in exactly one of three places:

    free ──lease()──▶ leased (held by the scheduler, unassigned)
      ▲                  │ hold(request, blocks)
      └──free_request()── held (ref count >= 1, by one or more requests)

A block's contents may outlive its holders: once full, the scheduler commits the
block's *chained hash* (hash of the parent block's hash, the block's token ids and
extra keys such as a cache salt). A committed block that is freed keeps its hash and
sits in the free list as a cached prefix; a request whose prompt starts with the same
blocks holds it again instead of recomputing it. Eviction is lazy: a cached block
loses its hash only when ``lease`` hands it out to be overwritten.

The free list is an ``OrderedDict`` used as an O(1) LRU queue: ``lease`` takes from
the front, ``free_request`` appends at the back, and a cache hit on a free block
removes it from the middle in O(1). A finished request's blocks go back tail first,
so the blocks holding a prompt's beginning (the ones other prompts share) are the
last to be evicted.

``hold`` covers three cases, which lets the scheduler allocate from its lease and
share cached blocks without a round trip (see services/scheduler/block_lease.py):
a leased block becomes held (an allocation); a held block gains a holder (sharing);
a free cached block leaves the free list (a hit on an evicted-later-than-looked-up
block is impossible: the scheduler only claims blocks its mirror still lists).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from shared.prefix_index import PrefixIndex


class BlockPoolError(ValueError):
    """The scheduler reported something impossible (a block it does not hold)."""


@dataclass(frozen=True, slots=True)
class PoolUsage:
    num_blocks: int
    used_blocks: int  # held by at least one request
    leased_blocks: int
    free_blocks: int  # cached ones included
    requests: int
    cached_blocks: int  # free blocks that still hold a committed prefix
    evictions: int  # cached blocks overwritten since the pool opened


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One block as ``kv dump`` shows it."""

    block_id: int
    ref_count: int
    block_hash: int | None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._leased: set[int] = set()
        self._refs: list[int] = [0] * num_blocks
        self._owned: dict[str, list[int]] = {}
        self._prefix = PrefixIndex()
        self.evictions = 0
        self._num_cached = 0  # free blocks with a hash (kept current: usage() is per step)

    # -------------------------------------------------------------- leasing

    def lease(self, count: int) -> list[int]:
        """Up to ``count`` free blocks, now leased (fewer when the pool runs low).
        Cached blocks handed out lose their hash: the scheduler will overwrite them."""
        granted: list[int] = []
        for _ in range(min(count, len(self._free))):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            granted.append(block)
        self._leased.update(granted)
        return granted

    def top_up(self, target: int) -> list[int]:
        """Lease enough new blocks that ``target`` are leased in all."""
        return self.lease(max(0, target - len(self._leased)))

    # -------------------------------------------------------------- holding

    def check_hold(self, request_id: str, blocks: Iterable[int]) -> None:
        """Raise unless ``hold(request_id, blocks)`` is possible."""
        for block in blocks:
            if not 0 <= block < self.num_blocks:
                raise BlockPoolError(f"{request_id}: block {block} outside the pool")
            if block in self._leased or self._refs[block] > 0:
                continue
            if not self._prefix.caches(block):
                raise BlockPoolError(
                    f"{request_id}: block {block} is free and caches nothing; it is "
                    "not leased"
                )

    def hold(self, request_id: str, blocks: Iterable[int], *, checked: bool = False) -> None:
        """``request_id`` now holds ``blocks`` (appended to its table): leased blocks
        are allocated, held or cached ones shared. ``checked``: the caller ran
        ``check_hold`` already (before frees that do not change its verdict)."""
        blocks = list(blocks)
        if not checked:
            self.check_hold(request_id, blocks)
        for block in blocks:
            if block in self._leased:
                self._leased.discard(block)
            elif self._refs[block] == 0:
                del self._free[block]  # a cache hit on a free block
                self._num_cached -= 1
            self._refs[block] += 1
        self._owned.setdefault(request_id, []).extend(blocks)

    def free_request(self, request_id: str) -> int:
        """Drop a request's hold on its blocks; unknown ids free nothing (frees are
        idempotent). Blocks nobody holds any more go to the free list tail first,
        keeping their hash. Returns how many blocks became free."""
        blocks = self._owned.pop(request_id, None)
        if not blocks:
            return 0
        freed = 0
        for block in reversed(blocks):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"block {block} freed more often than held"
            if self._refs[block] == 0:
                self._free[block] = None
                freed += 1
                if self._prefix.caches(block):
                    self._num_cached += 1
        return freed

    def check_drop(self, request_id: str, block: int) -> None:
        if block not in self._owned.get(request_id, ()):
            raise BlockPoolError(f"{request_id}: drops block {block}, which it does not hold")

    def drop(self, request_id: str, block: int) -> None:
        """``request_id`` gives up its hold on one shared block (copy-on-write: it
        writes into a copy instead). A block nobody holds any more goes to the free
        list, keeping its hash. O(the request's table)."""
        self.check_drop(request_id, block)
        table = self._owned[request_id]
        table.remove(block)
        if not table:
            del self._owned[request_id]
        self._refs[block] -= 1
        assert self._refs[block] >= 0, f"block {block} dropped more often than held"
        if self._refs[block] == 0:
            self._free[block] = None
            if self._prefix.caches(block):
                self._num_cached += 1

    # -------------------------------------------------------------- prefix index

    def commit_hash(self, block: int, block_hash: int) -> bool:
        """Record that ``block`` (held, or just freed) holds the full block whose
        chained hash is ``block_hash``. A hash already cached in another block
        stays there (this block is simply not indexed), and a leased block (handed
        out again, to be overwritten) is not indexed either. Returns whether indexed."""
        if not 0 <= block < self.num_blocks:
            raise BlockPoolError(f"block {block} outside a pool of {self.num_blocks}")
        if block in self._leased or not self._prefix.add(block, block_hash):
            return False
        if self._refs[block] == 0:
            self._num_cached += 1
        return True

    def uncache(self, blocks: Iterable[int]) -> None:
        """Forget the hashes of ``blocks`` (their contents are not to be trusted,
        e.g. the step that wrote them failed)."""
        for block in blocks:
            if 0 <= block < self.num_blocks:
                self._evict(block, counted=False)

    def lookup(self, block_hashes: Iterable[int]) -> list[int]:
        """The blocks caching the longest prefix of ``block_hashes`` (a chain)."""
        return self._prefix.lookup(block_hashes)

    def hash_of(self, block: int) -> int | None:
        return self._prefix.hash_of(block)

    def _evict(self, block: int, counted: bool = True) -> None:
        if self._prefix.remove(block) is not None:
            if self._refs[block] == 0 and block not in self._leased:
                self._num_cached -= 1
            if counted:
                self.evictions += 1

    # -------------------------------------------------------------- restore, views

    def restore(self, owned: dict[str, list[int]], leased: Iterable[int]) -> None:
        """Rebuild state another incarnation held (after a KV manager restart).
        Requests may share blocks (prefix hits); a leased block is held by none."""
        leased = set(leased)
        refs = [0] * self.num_blocks
        for request_id, blocks in owned.items():
            for block in blocks:
                if not 0 <= block < self.num_blocks:
                    raise BlockPoolError(
                        f"{request_id}: block {block} outside a pool of {self.num_blocks}")
                if block in leased:
                    raise BlockPoolError(f"{request_id}: block {block} is held and leased")
                refs[block] += 1
        out_of_range = [b for b in leased if not 0 <= b < self.num_blocks]
        if out_of_range:
            raise BlockPoolError(f"blocks {out_of_range[:8]} outside a pool of {self.num_blocks}")
        self._leased = leased
        self._refs = refs
        self._owned = {r: list(b) for r, b in owned.items() if b}
        self._prefix = PrefixIndex()
        self._num_cached = 0
        self._free = OrderedDict.fromkeys(
            b for b in range(self.num_blocks) if b not in leased and refs[b] == 0)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def describe(self, request_id: str) -> list[BlockInfo]:
        return [BlockInfo(b, self._refs[b], self._prefix.hash_of(b))
                for b in self._owned.get(request_id, ())]

    def usage(self) -> PoolUsage:
        used = self.num_blocks - len(self._free) - len(self._leased)
        return PoolUsage(
            num_blocks=self.num_blocks,
            used_blocks=used,
            leased_blocks=len(self._leased),
            free_blocks=len(self._free),
            requests=len(self._owned),
            cached_blocks=self._num_cached,
            evictions=self.evictions,
        )
