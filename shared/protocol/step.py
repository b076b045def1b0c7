"""scheduler <-> worker: one message per step each way.

The worker keeps per-request state (prompt, computed tokens, block table, last
sampled token, sampling params). A request's prompt and params travel once, in
``NewRequest``; every later step sends only what changed, as the per-request
tables of shared/protocol/tables.py (int arrays packed).

Block tables only grow while a request runs (appends), except for copy-on-write
(a position gets a fresh copy) and the host tier (a swap-out empties the table, a
swap-in gives it a whole new one); a request preempted by recompute is finished at
the worker and comes back as a new one.

Decode input tokens are never sent: the worker feeds a request's own last sampled
token. That lets the scheduler plan step N+1 before step N's tokens come back.

Schema evolution: new fields get defaults and go last; a breaking change bumps
``PROTOCOL_VERSION`` (shared/protocol/envelope.py).
"""

from __future__ import annotations

import msgspec

from shared.protocol.envelope import pack_i32
from shared.protocol.generation import SamplingParams
from shared.protocol.logprobs import Logprobs
from shared.protocol.tables import (
    BlockCopies,
    BlockMoves,
    BlockReplaces,
    TableError,
    pack_rows,
    split_rows,
    unpack_ints,
)


class NewRequest(msgspec.Struct, frozen=True, array_like=True, gc=False):
    request_id: str
    token_ids: bytes  # packed int32: prompt, plus outputs so far after a preemption
    num_output_tokens: int  # how many of token_ids are outputs (seeded noise index)
    sampling: SamplingParams
    # Tokens whose K/V the request's first blocks already hold (a prefix-cache hit):
    # the worker starts computing there. Always a whole number of blocks, and less
    # than len(token_ids) (the last token is computed again for its logits).
    num_computed_tokens: int = 0


class StepBatch(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The requests computed in a step: ``request_ids[i]`` appends the next
    ``num_blocks[i]`` of ``block_ids`` to its table, then computes ``num_tokens[i]``
    more tokens (a prefill chunk, or 1 decode token)."""

    request_ids: list[str] = []
    num_tokens: bytes = b""  # packed int32, one per request
    num_blocks: bytes = b""  # packed int32, one per request
    block_ids: bytes = b""  # packed int32, rows concatenated

    @classmethod
    def pack(cls, request_ids: list[str], num_tokens: list[int],
             appends: list[list[int]]) -> StepBatch:
        counts, blocks = pack_rows(appends)
        return cls(request_ids, pack_i32(num_tokens), counts, blocks)

    def unpack(self) -> tuple[list[int], list[list[int]]]:
        """(num_tokens, appended blocks) per request. Raises TableError."""
        count = len(self.request_ids)
        num_tokens = unpack_ints(self.num_tokens, "num_tokens")
        if len(num_tokens) != count:
            raise TableError(f"{len(num_tokens)} num_tokens for {count} request_ids")
        if len(set(self.request_ids)) != count:
            raise TableError("request_ids has duplicates")
        (appends,) = split_rows(self.num_blocks, count, [(self.block_ids, "block_ids")],
                                "num_blocks")
        return num_tokens, appends


class StepPlan(msgspec.Struct, frozen=True, tag=True, gc=False):
    """What to compute in one step. The worker checks the whole plan first (an
    inconsistent one changes nothing), then applies its fields in this order:

    1. ``finished``: drop these requests (ids it does not know are ignored);
    2. ``new``: register these requests (an id just dropped may come back);
    3. ``host_num_blocks``: >= 0 resizes the host block store to that many blocks
       (blocks below it keep their contents); -1: unchanged;
    4. ``swap_out``: device block -> host block, per request; its table is then
       empty (it stays registered, with its tokens and computed count);
    5. ``swap_in``: host block -> device block, per request; the device blocks, in
       order, become its whole table;
    6. ``replaces``: copy-on-write, a table position gets the fresh copy of the block
       it shared (positions within the table before this step's appends);
    7. ``copies``: copy-on-write, block ``src`` into ``dst`` (all layers, K and V), in
       order, before any of this step's K/V writes;
    8. ``batch``: appends to the tables, then the compute itself.
    """

    step_id: int
    finished: list[str] = []
    new: list[NewRequest] = []
    host_num_blocks: int = -1
    swap_out: BlockMoves = BlockMoves()
    swap_in: BlockMoves = BlockMoves()
    replaces: BlockReplaces = BlockReplaces()
    copies: BlockCopies = BlockCopies()
    batch: StepBatch = StepBatch()
    # W3C traceparents of the requests in this step, so the worker's step span can
    # link to each; empty when tracing is off.
    trace_links: list[str] = []


class StepResult(msgspec.Struct, frozen=True, tag=True, gc=False):
    """One sampled token per request that finished its prompt in this step
    (requests mid-way through a chunked prefill sample nothing)."""

    step_id: int
    request_ids: list[str]
    token_ids: bytes  # packed int32
    error: str | None = None
    # Parallel to request_ids for the requests that asked (the others: no entry):
    # (index in request_ids, logprobs of its sampled token).
    logprobs: list[tuple[int, Logprobs]] = []
    # Prompt logprobs of this step's prefill chunks: (request id, rows).
    prompt_logprobs: list[tuple[str, Logprobs]] = []
