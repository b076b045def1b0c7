"""The prefix cache's index: committed chained block hash <-> block. Pure.

The KV manager keeps the authoritative one per pool; the scheduler keeps an exact
mirror of it (so admission looks prefixes up without a round trip), built from
this same class. A hash is cached in at most one block and a block caches at most
one hash: the first block committed under a hash keeps it.
"""

from __future__ import annotations

from collections.abc import Iterable


class PrefixIndex:
    def __init__(self) -> None:
        self._block_of: dict[int, int] = {}  # hash -> block
        self._hash_of: dict[int, int] = {}  # block -> hash

    def __len__(self) -> int:
        return len(self._block_of)

    def add(self, block: int, block_hash: int) -> bool:
        """Index ``block`` under ``block_hash``; False (and nothing changes) when
        the hash is cached elsewhere already or the block caches another hash."""
        if block_hash in self._block_of or block in self._hash_of:
            return False
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def remove(self, block: int) -> int | None:
        """Forget what ``block`` caches; returns the hash it had, if any."""
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None:
            del self._block_of[block_hash]
        return block_hash

    def caches(self, block: int) -> bool:
        return block in self._hash_of

    def hash_of(self, block: int) -> int | None:
        return self._hash_of.get(block)

    def lookup(self, block_hashes: Iterable[int]) -> list[int]:
        """The blocks caching the longest prefix of ``block_hashes`` (a chain: a
        block's hash covers its parent's, so the first miss ends the prefix)."""
        hits: list[int] = []
        for block_hash in block_hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits
