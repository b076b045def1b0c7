"""The scheduler's side of one worker's KV pool: free blocks leased ahead from the
KV manager, a mirror of the pool's prefix index, and what was done since the last
sync. Pure, no I/O.

Planning takes blocks from the lease and looks prefixes up in the mirror
synchronously; the KV manager hears about both in the next ``KvSync`` (at most one
in flight), whose answer tops the lease up while the worker computes. Planning
therefore never waits on the KV manager.

The mirror is exact because the scheduler sees every change to the index: it
commits every hash itself, and the KV manager evicts a cached block only by leasing
it, so every block in a grant has lost its hash. One race remains: a sync already in
flight may grant (evict) a cached block the scheduler has just shared with a request.
Its contents are intact (nobody wrote it), so the grant skips it and the request's
hold, when reported, turns the KV manager's leased block into a held one.

Ref counts here count the live requests of this pool that hold a block; the KV
manager's count the same holders once the next sync is applied.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shared.prefix_index import PrefixIndex
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.kv import KvLease, KvPoolOpen, KvSync, KvUsage
from shared.protocol.tables import BlockHashes, RequestBlocks


@dataclass(slots=True)
class SinceSync:
    """What the scheduler did to one pool since its last sync (or re-open): the next
    ``KvSync``'s content, plus the bookkeeping that lives exactly as long."""

    # Per request, in order: blocks taken from the lease, and cached blocks shared
    # (prefix hits).
    taken: dict[str, list[int]] = field(default_factory=dict)
    shared: dict[str, list[int]] = field(default_factory=dict)
    commits: dict[int, int] = field(default_factory=dict)  # block -> hash
    uncache: list[int] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)  # copy-on-write
    # Blocks taken from the lease: the KV manager counts them as leased, so if every
    # holder lets go before the sync they are ours again (a fork or a same-step
    # prefix hit may share one with the request that took it, and both may end
    # before any sync).
    fresh: set[int] = field(default_factory=set)
    # Blocks a grant handed us while a request held them (the race above): the KV
    # manager counts them as leased until that request's hold arrives.
    granted_held: set[int] = field(default_factory=set)
    # Blocks a single allocation wanted and the lease lacked: the next sync asks
    # for at least that many, so a lease smaller than one chunk cannot stall.
    shortfall: int = 0
    # Host tier: swapped-out requests' host blocks, and requests whose reported
    # host blocks were given up.
    host_held: dict[str, list[int]] = field(default_factory=dict)
    host_released: list[str] = field(default_factory=list)

    def has_news(self) -> bool:
        return bool(self.taken or self.shared or self.freed or self.commits or self.dropped
                    or self.uncache or self.host_held or self.host_released)


class BlockLease:
    def __init__(self, pool_id: str, num_blocks: int, block_size: int, target: int) -> None:
        self.pool_id = pool_id
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.target = min(target, num_blocks)
        self._free: deque[int] = deque()
        self.refs: list[int] = [0] * num_blocks
        # The mirror of the KV manager's prefix index (the same structure).
        self._prefix = PrefixIndex()
        # Everything since the last sync, replaced whole when a sync is sent.
        self._since = SinceSync()
        self._seq = 0
        self.sync_in_flight = False
        self.opened = False  # the KV manager granted the first lease
        self.usage: KvUsage | None = None

    @property
    def cached_blocks(self) -> int:
        """Blocks the pool's prefix index holds (held or evictable)."""
        return len(self._prefix)

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

    # ------------------------------------------------------------ allocation

    def take(self, request_id: str, count: int) -> list[int] | None:
        """``count`` blocks for ``request_id``, or None (and nothing taken)."""
        if count > len(self._free):
            self._since.shortfall = max(self._since.shortfall, count)
            return None
        taken = [self._free.popleft() for _ in range(count)]
        self._since.fresh.update(taken)
        for block in taken:
            self.refs[block] = 1
        if taken:
            self._since.taken.setdefault(request_id, []).extend(taken)
        return taken

    def lookup(self, block_hashes: list[int]) -> list[int]:
        """Blocks caching the longest prefix of this chain of block hashes."""
        return self._prefix.lookup(block_hashes)

    def share(self, request_id: str, blocks: list[int]) -> None:
        """``request_id`` holds these cached blocks too (a prefix hit)."""
        for block in blocks:
            self.refs[block] += 1
        if blocks:
            self._since.shared.setdefault(request_id, []).extend(blocks)

    def drop(self, request_id: str, block: int) -> None:
        """``request_id`` gives up one block it holds along with others (copy-on-write:
        it writes into a copy from ``take``). A hold the KV manager has not heard of
        is simply not reported; if nobody holds the block any more it goes straight
        back to the lease, like ``release`` does."""
        self.refs[block] -= 1
        assert self.refs[block] >= 0, f"block {block} dropped more often than held"
        unreported = self._since.taken.get(request_id, [])
        shared = self._since.shared.get(request_id, [])
        if block in unreported:
            unreported.remove(block)
            if self.refs[block] == 0:
                self._reclaim(block)
        elif block in shared:
            shared.remove(block)
            if self.refs[block] == 0 and block in self._since.granted_held:
                self._since.granted_held.discard(block)
                self._free.appendleft(block)
            elif self.refs[block] == 0 and block in self._since.fresh:
                self._reclaim(block)
        else:
            self._since.dropped.setdefault(request_id, []).append(block)

    def _reclaim(self, block: int) -> None:
        """A block taken since the last sync that nobody holds: back to the lease,
        without the hash it may have been given (its contents were never reported)."""
        self._since.fresh.discard(block)
        self._forget(block)
        self._since.commits.pop(block, None)
        self._free.appendleft(block)

    def commit(self, block: int, block_hash: int) -> None:
        """A held block is full (its tokens are scheduled): index it. A hash
        already cached elsewhere stays there."""
        if self._prefix.add(block, block_hash):
            self._since.commits[block] = block_hash

    def uncache(self, blocks: list[int]) -> None:
        """Forget these blocks' hashes (the step that was to write them failed)."""
        for block in blocks:
            self._forget(block)
            self._since.commits.pop(block, None)
        self._since.uncache.extend(blocks)

    def _forget(self, block: int) -> None:
        self._prefix.remove(block)

    def release(self, request_id: str, blocks: list[int]) -> None:
        """A request gave up ``blocks`` (all it held). Allocations the KV manager has
        not heard of and nobody else holds go straight back to the lease (their
        contents were never reported, so they lose their hash); the rest are
        reported freed."""
        for block in blocks:
            self.refs[block] -= 1
            assert self.refs[block] >= 0, f"block {block} released more often than held"
        unreported = self._since.taken.pop(request_id, [])
        shared = self._since.shared.pop(request_id, [])
        for block in reversed(unreported):
            if self.refs[block] == 0:
                self._reclaim(block)
            # else: another request shares it; its hold reports the block.
        for block in shared:
            if self.refs[block] == 0 and block in self._since.granted_held:
                # Evicted to us while held; no hold will reach the KV manager now.
                self._since.granted_held.discard(block)
                self._free.appendleft(block)
            elif self.refs[block] == 0 and block in self._since.fresh:
                # Taken by a request that ended before any sync: still leased there.
                self._reclaim(block)
        if len(blocks) > len(unreported) + len(shared):
            self._since.freed.append(request_id)

    def host_hold(self, request_id: str, blocks: list[int]) -> None:
        """``request_id`` was swapped out into these host blocks."""
        self._since.host_held[request_id] = list(blocks)

    def host_release(self, request_id: str) -> None:
        """``request_id`` no longer holds host blocks (a hold not yet reported is
        simply not reported)."""
        if self._since.host_held.pop(request_id, None) is None:
            self._since.host_released.append(request_id)

    # ------------------------------------------------------------ sync

    def sync_message(self) -> KvSync | None:
        """The next sync, if one is due and none is in flight."""
        since = self._since
        if self.sync_in_flight or not self.opened:
            return None
        if not since.has_news() and len(self._free) >= max(self.target // 2, since.shortfall):
            return None
        held: dict[str, list[int]] = {}
        for table in (since.taken, since.shared):
            for request_id, blocks in table.items():
                held.setdefault(request_id, []).extend(blocks)
        self._seq += 1
        message = KvSync(
            pool_id=self.pool_id,
            seq=self._seq,
            uncache=pack_i32(since.uncache),
            drops=RequestBlocks.pack(since.dropped),
            freed=since.freed,
            holds=RequestBlocks.pack(held),
            commits=BlockHashes.pack(since.commits),
            host_released=since.host_released,
            host_holds=RequestBlocks.pack(since.host_held),
            lease_target=max(self.target, since.shortfall),
        )
        # Reported holds resolve the grant race too: those blocks are held at the
        # KV manager once this sync applies.
        self._since = SinceSync()
        self.sync_in_flight = True
        return message

    def on_lease(self, lease: KvLease) -> None:
        if lease.seq != self._seq:
            # The answer to a sync sent before a re-open (KV manager restart): its
            # blocks belong to the old incarnation's view; the re-open's answer counts.
            return
        for block in unpack_i32(lease.block_ids):
            # A granted block was evicted: it caches nothing any more.
            self._forget(block)
            self._since.commits.pop(block, None)
            if self.refs[block] > 0:
                self._since.granted_held.add(block)
            else:
                self._free.append(block)
        self.usage = lease.usage
        self.sync_in_flight = False
        self.opened = True

    def open_message(self, held: dict[str, list[int]], block_bytes: int = 0,
                     host_held: dict[str, list[int]] | None = None) -> KvPoolOpen:
        """Open the pool at a (possibly new) KV manager with everything held now:
        ``held`` maps each live request to its whole block table. The new pool
        caches nothing, so the mirror starts empty too."""
        # The new pool hears of swapped-out requests in the first sync; blocks
        # granted while held are the pool's own again once it is rebuilt from what
        # is held (the old lease stays ours).
        self._since = SinceSync(host_held=dict(host_held or {}), shortfall=self._since.shortfall)
        self._prefix = PrefixIndex()
        self.sync_in_flight = True
        self._seq += 1
        return KvPoolOpen(
            pool_id=self.pool_id,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            lease_target=self.target,
            holds=RequestBlocks.pack({r: b for r, b in held.items() if b}),
            leased_blocks=pack_i32(self._free),
            seq=self._seq,
            block_bytes=block_bytes,
        )
