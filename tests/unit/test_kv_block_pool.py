"""The KV manager's block pool and prefix index under hypothesis' stateful testing.

The machine plays a scheduler: it leases blocks, gives them to requests, writes
token contents into them (a model of the K/V), commits the hashes of full blocks,
shares cached blocks on a prefix hit, frees requests and forgets hashes. After every
step it checks the pool against a plain model:

- ref counts are never negative and equal the number of live holders;
- every block is in exactly one place (free, leased or held);
- a lookup never returns a block whose contents differ from the hashed tokens;
- once every request has ended, no block is held (nothing leaked).
"""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from services.kvcache.block_pool import BlockPool, BlockPoolError

NUM_BLOCKS = 12
BLOCK = 2  # tokens per block
TOKENS = st.lists(st.integers(0, 2), min_size=BLOCK, max_size=BLOCK)


def chain(prefix: tuple[tuple[int, ...], ...]) -> int:
    """A chained hash that never collides in this test: the prefix itself."""
    return hash(prefix)


class PoolMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.pool = BlockPool(NUM_BLOCKS)
        self.leased: list[int] = []
        # Live requests: their block table and the token prefix each block holds.
        self.tables: dict[str, list[int]] = {}
        self.prefixes: dict[str, list[tuple[int, ...]]] = {}
        self.contents: dict[int, tuple[tuple[int, ...], ...]] = {}  # what a block holds
        self.committed: dict[int, int] = {}  # block -> hash we committed (may be evicted)
        self.next_id = 0

    # ---------------------------------------------------------------- rules

    @rule(count=st.integers(1, 6))
    def lease(self, count: int) -> None:
        granted = self.pool.lease(count)
        assert len(set(granted)) == len(granted)
        for block in granted:
            assert self.pool.hash_of(block) is None, "a leased block kept its hash"
            self.contents.pop(block, None)
        self.leased.extend(granted)

    @precondition(lambda self: self.leased)
    @rule(data=st.data())
    def start_request(self, data: st.DataObject) -> None:
        """A new request: a prefix hit on cached blocks, then fresh leased blocks."""
        request_id = f"r{self.next_id}"
        self.next_id += 1
        wanted = data.draw(st.lists(TOKENS, min_size=1, max_size=4))
        prefix = tuple(tuple(t) for t in wanted)
        hashes = [chain(prefix[: i + 1]) for i in range(len(prefix))]
        hits = self.pool.lookup(hashes)
        for i, block in enumerate(hits):
            assert self.contents.get(block) == prefix[: i + 1], "a hit on other tokens"
        fresh_count = min(len(prefix) - len(hits), len(self.leased))
        fresh = [self.leased.pop(0) for _ in range(fresh_count)]
        table = hits + fresh
        self.pool.hold(request_id, table)
        self.tables[request_id] = table
        self.prefixes[request_id] = list(prefix[: len(table)])
        for i, block in enumerate(fresh, start=len(hits)):
            self.contents[block] = prefix[: i + 1]  # the step writes the tokens

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def commit_full_blocks(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.tables)))
        for i, block in enumerate(self.tables[request_id]):
            prefix = tuple(self.prefixes[request_id][: i + 1])
            if self.pool.commit_hash(block, chain(prefix)):
                self.committed[block] = chain(prefix)

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free_request(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.tables)))
        self.pool.free_request(request_id)
        assert self.pool.free_request(request_id) == 0, "a second free freed something"
        del self.tables[request_id]
        del self.prefixes[request_id]

    @precondition(lambda self: self.committed)
    @rule(data=st.data())
    def uncache(self, data: st.DataObject) -> None:
        block = data.draw(st.sampled_from(sorted(self.committed)))
        self.pool.uncache([block])
        assert self.pool.hash_of(block) is None

    @rule(block=st.integers(0, NUM_BLOCKS - 1))
    def impossible_hold_is_refused(self, block: int) -> None:
        """Holding a free block that caches nothing is refused, state unchanged."""
        if (block in self.leased or self.pool.ref_count(block) > 0
                or self.pool.hash_of(block) is not None):
            return
        before = self.pool.usage()
        try:
            self.pool.hold("intruder", [block])
        except BlockPoolError:
            pass
        else:
            raise AssertionError("held a free, uncached block")
        assert self.pool.usage() == before

    # ---------------------------------------------------------------- invariants

    @invariant()
    def ref_counts_match_holders(self) -> None:
        holders = Counter(b for table in self.tables.values() for b in table)
        for block in range(NUM_BLOCKS):
            assert self.pool.ref_count(block) >= 0
            assert self.pool.ref_count(block) == holders[block]

    @invariant()
    def every_block_in_one_place(self) -> None:
        usage = self.pool.usage()
        held = {b for table in self.tables.values() for b in table}
        assert usage.leased_blocks == len(self.leased)
        assert usage.used_blocks == len(held)
        assert usage.free_blocks + usage.leased_blocks + usage.used_blocks == NUM_BLOCKS
        assert not held.intersection(self.leased)
        assert 0 <= usage.cached_blocks <= usage.free_blocks

    @invariant()
    def lookups_return_what_was_hashed(self) -> None:
        for block, block_hash in self.committed.items():
            if self.pool.hash_of(block) == block_hash:
                assert self.pool.lookup([block_hash]) == [block]
                assert chain(self.contents[block]) == block_hash, "hash of other tokens"

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        for request_id in list(self.tables):
            self.pool.free_request(request_id)
        usage = self.pool.usage()
        assert usage.used_blocks == 0 and usage.requests == 0, "blocks leaked"
        assert usage.free_blocks + usage.leased_blocks == NUM_BLOCKS


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None)
TestBlockPool = PoolMachine.TestCase


def test_lru_evicts_least_recently_freed_and_tail_first() -> None:
    pool = BlockPool(4)
    blocks = pool.lease(4)
    pool.hold("a", blocks[:2])
    pool.hold("b", blocks[2:])
    for i, block in enumerate(blocks):
        pool.commit_hash(block, 100 + i)
    pool.free_request("a")  # a's tail (blocks[1]) first, then its head
    pool.free_request("b")
    assert pool.usage().cached_blocks == 4
    # A hit on a free block takes it off the free list without evicting it.
    pool.hold("c", pool.lookup([100]))
    assert pool.lease(1) == [blocks[1]]  # a's tail: freed first, least useful
    assert pool.lease(1) == [blocks[3]]
    assert pool.usage().evictions == 2 and pool.lookup([100, 101]) == [blocks[0]]
