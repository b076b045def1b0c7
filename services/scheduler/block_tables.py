"""A request's block table on its worker's lease: growth with copy-on-write, and
the prefix cache (lookup at admission, commits as blocks fill). Pure.

Block tables grow append-only, except that a request about to write into a block
another live request holds (a fork's shared prompt block) gets a fresh copy in
its place first (see forks.py).

Prefix caching (``enable_prefix_caching``): a request's full blocks are hashed in a
chain (shared/prefix_index.py) and committed to the pool's prefix index as soon as
their tokens are scheduled; admission looks the prompt up once in the lease's
mirror of that index and starts the request after the longest cached prefix
(whole blocks, never the last token, whose logits are needed). A hit may read
blocks that an earlier request computes in this very step: the worker writes a
step's K/V before any attention reads it. ``Submit.cache_salt`` roots the hash
chain, so requests under different salts never share a block.
"""

from __future__ import annotations

from services.scheduler.block_lease import BlockLease
from services.scheduler.request import Request
from shared.prefix_index import extend_block_hashes


def lookup(lease: BlockLease, request: Request) -> list[int]:
    """Cached blocks for the longest prefix of the request's tokens, short of
    its last token. Hashing is O(prompt) once per admission; the lookup is a
    dict probe per block, whatever the cache holds."""
    return lease.lookup(prefix_hashes(request, lease.block_size))


def prefix_hashes(request: Request, block_size: int) -> list[int]:
    """The chained hashes of the request's full blocks short of its last token:
    what a prefix hit can cover. Computed once per request and kept (they depend on
    tokens only; every worker of a mesh has the same block size). A request that
    still owes its prompt logprobs reads nothing cached: each prompt position must
    be computed (vLLM skips the prefix cache for these too)."""
    if request.sampling.prompt_logprobs >= 0 and request.num_outputs == 0:
        return []
    usable = (len(request.token_ids) - 1) // block_size
    hashes = extend_block_hashes(request.block_hashes, request.token_ids, block_size,
                                 usable, request.salt)
    return hashes[:usable]


def commit_full_blocks(lease: BlockLease, request: Request) -> None:
    """Index the request's blocks whose tokens are all known and scheduled."""
    block_size = lease.block_size
    full = min(request.num_scheduled, len(request.token_ids)) // block_size
    if full <= request.num_committed_blocks:
        return
    hashes = extend_block_hashes(request.block_hashes, request.token_ids, block_size, full,
                                 request.salt)
    for i in range(request.num_committed_blocks, full):
        lease.commit(request.block_ids[i], hashes[i])
    request.num_committed_blocks = full


def grow(lease: BlockLease, request: Request, count: int
         ) -> tuple[list[int], list[tuple[int, int, int]]] | None:
    """Blocks to append so the next ``count`` positions have slots, and the
    copy-on-write copies (table position, shared block, its fresh copy) for
    blocks among the written ones that another request holds too. Both come
    from the lease in one take: None (and nothing changed) when it is short.
    Only the blocks this step writes are looked at."""
    end = request.num_scheduled + count
    needed = max(0, lease.blocks_for(end) - len(request.block_ids))
    written = range(request.num_scheduled // lease.block_size,
                    min(len(request.block_ids), lease.blocks_for(end)))
    shared = [i for i in written if lease.refs[request.block_ids[i]] > 1]
    if needed + len(shared) == 0:
        return [], []
    taken = lease.take(request.request_id, needed + len(shared))
    if taken is None:
        return None
    copies = []
    for position, fresh in zip(shared, taken[needed:], strict=True):
        src = request.block_ids[position]
        request.block_ids[position] = fresh
        lease.drop(request.request_id, src)
        copies.append((position, src, fresh))
    return taken[:needed], copies
