"""Chained block hashes for prefix caching. Pure.

Block i of a token sequence is identified by ``hash((hash of block i-1, the block's
token ids))``; block 0's parent is a seed derived from the request's extra keys (a
cache salt), so equal blocks after different prefixes, or under different salts,
never match. Only full blocks are hashed.

The hashes live in the scheduler process only (its mirror of the prefix index and
the KV manager's index hold the values the scheduler computed), so Python's
per-process ``hash`` of bytes (SipHash, keyed at random per process) is stable
where it needs to be and hard to collide on purpose.
"""

from __future__ import annotations

from array import array

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
