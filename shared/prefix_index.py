"""The prefix-cache contract the KV manager and the scheduler must agree on. Pure.

Two parts, both used on both sides of the scheduler <-> kvcache socket:

- **The block-hash chain.** Block i of a token sequence is identified by
  ``hash((hash of block i-1, the block's token ids))``; block 0's parent is a seed
  derived from the request's extra keys (a cache salt), so equal blocks after
  different prefixes, or under different salts, never match. Only full blocks are
  hashed. The hashes are computed in the scheduler process only (its mirror of the
  index and the KV manager's index hold the values the scheduler computed), so
  Python's per-process ``hash`` of bytes (SipHash, keyed at random per process) is
  stable where it needs to be and hard to collide on purpose.
- **The index** (``PrefixIndex``): committed chained block hash <-> block. The KV
  manager keeps the authoritative one per pool; the scheduler keeps an exact mirror
  of it (so admission looks prefixes up without a round trip), built from this same
  class. A hash is cached in at most one block and a block caches at most one hash:
  the first block committed under a hash keeps it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

ROOT = hash("meshserve.prefix-root")


def root_hash(salt: str = "") -> int:
    return hash((ROOT, salt)) if salt else ROOT


def extend_block_hashes(hashes: list[int], token_ids: array[int], block_size: int,
                        num_blocks: int, salt: str = "") -> list[int]:
    """Append hashes to ``hashes`` until it covers ``num_blocks`` full blocks of
    ``token_ids`` (or every full block there is). Returns ``hashes``."""
    num_blocks = min(num_blocks, len(token_ids) // block_size)
    parent = hashes[-1] if hashes else root_hash(salt)
    for i in range(len(hashes), num_blocks):
        parent = hash((parent, token_ids[i * block_size:(i + 1) * block_size].tobytes()))
        hashes.append(parent)
    return hashes


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
