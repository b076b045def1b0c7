"""scheduler <-> worker: one message per step each way.

The worker keeps per-request state (prompt, computed tokens, block table, last
sampled token, sampling params). A request's prompt and params travel once, in
``NewRequest``; every later step sends only what changed, with int arrays packed.

Block tables are append-only while a request lives, so a step only appends; a
preempted request is finished at the worker and comes back as a new one.

Decode input tokens are never sent: the worker feeds a request's own last sampled
token. That lets the scheduler plan step N+1 before step N's tokens come back.
"""

from __future__ import annotations

import msgspec

from shared.protocol.generation import SamplingParams


class NewRequest(msgspec.Struct, frozen=True, array_like=True, gc=False):
    request_id: str
    token_ids: bytes  # packed int32: prompt, plus outputs so far after a preemption
    num_output_tokens: int  # how many of token_ids are outputs (seeded noise index)
    sampling: SamplingParams
    # Tokens whose K/V the request's first blocks already hold (a prefix-cache hit):
    # the worker starts computing there. Always a whole number of blocks, and less
    # than len(token_ids) (the last token is computed again for its logits).
    num_computed_tokens: int = 0


class StepPlan(msgspec.Struct, frozen=True, tag=True, gc=False):
    """What to compute in one step.

    ``request_ids[i]`` computes ``num_tokens[i]`` more tokens (a prefill chunk or 1
    decode token). ``block_owner[j]`` is the index into ``request_ids`` that block
    ``block_ids[j]`` is appended to. ``finished`` requests are dropped before the
    step runs; ``new`` requests are registered before it.
    """

    step_id: int
    new: list[NewRequest]
    request_ids: list[str]
    num_tokens: bytes  # packed int32, one per request_ids entry
    block_owner: bytes  # packed int32
    block_ids: bytes  # packed int32
    finished: list[str]
    # W3C traceparents of the requests in this step, so the worker's step span can
    # link to each; empty when tracing is off.
    trace_links: list[str] = []
    # Copy-on-write: before computing, the worker copies block ``copy_src[j]`` into
    # ``copy_dst[j]`` (all layers, K and V), in order. The destination was just
    # appended to a request's table in place of the source (a fork about to write
    # into a block it shares).
    copy_src: bytes = b""  # packed int32
    copy_dst: bytes = b""  # packed int32
    # Copy-on-write replaces a block *inside* a table: ``replace_owner[j]`` (index
    # into request_ids) swaps table position ``replace_index[j]`` for block
    # ``replace_block[j]``. Applied after the appends above.
    replace_owner: bytes = b""  # packed int32
    replace_index: bytes = b""  # packed int32
    replace_block: bytes = b""  # packed int32
    # Host tier. ``host_num_blocks`` >= 0 resizes the worker's host block store to
    # that many blocks (blocks below it keep their contents); -1: unchanged.
    host_num_blocks: int = -1
    # Swap-out: request ``swap_out_requests[swap_out_owner[j]]`` moves device block
    # ``swap_out_src[j]`` into host block ``swap_out_dst[j]``; its block table is
    # then empty (it stays registered, with its tokens and computed count).
    swap_out_requests: list[str] = []
    swap_out_owner: bytes = b""  # packed int32
    swap_out_src: bytes = b""  # packed int32, device blocks
    swap_out_dst: bytes = b""  # packed int32, host blocks
    # Swap-in: host block ``swap_in_src[j]`` goes into device block
    # ``swap_in_dst[j]``; a request's destinations, in order, become its whole block
    # table. Order at the worker: drop finished, register new, swap-outs, swap-ins,
    # appends, replaces, copies, compute.
    swap_in_requests: list[str] = []
    swap_in_owner: bytes = b""  # packed int32
    swap_in_src: bytes = b""  # packed int32, host blocks
    swap_in_dst: bytes = b""  # packed int32, device blocks


class StepResult(msgspec.Struct, frozen=True, tag=True, gc=False):
    """One sampled token per request that finished its prompt in this step
    (requests mid-way through a chunked prefill sample nothing)."""

    step_id: int
    request_ids: list[str]
    token_ids: bytes  # packed int32
    error: str | None = None
