"""One step's inputs for the Triton attention path (CUDA), built without a host sync.

Everything a step needs per token and per request is gathered on the host into
one int32 buffer in pinned memory and sent to the device with one non-blocking
copy; the device-side tensors are views of that copy, and the slot mapping is
computed on the device from them. So the host never waits for the GPU while it
prepares a step (a pageable ``.to(device)`` waits for every kernel queued before
it, which serialised host preparation and GPU compute).

Unlike the reference path's decodes-first layout, requests stay in plan order:
the kernel takes variable-length query runs, so no reordering is needed.

    buffer: [ input_ids T | positions T | seq_lens R | query_start R+1 |
              block_tables R*W | tile_request N | tile_start N | sample_rows S ]
"""

from __future__ import annotations

import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from services.worker.kernels.paged_attention import (
    paged_attention,
    split_decode_attention,
    tile_rows,
)
from services.worker.step_batch import PENDING, RequestState, blocks_for

# Split a decode's keys when the batch leaves most of the GPU idle and contexts are
# long: below this many programs (requests x KV heads) and above this context.
SPLIT_BELOW_PROGRAMS = 128
SPLIT_MIN_CONTEXT = 2048
SPLIT_KEYS = 1024  # keys per split


@dataclass(slots=True)
class KernelAttentionMetadata:
    """Device tensors the Triton kernel reads, shared by every layer of a step."""

    slot_mapping: torch.Tensor  # [T] int64: where each token's K/V go in the flat cache
    block_tables: torch.Tensor  # [R, W] int32
    seq_lens: torch.Tensor  # [R] int32: positions cached after this step
    query_start: torch.Tensor  # [R + 1] int32
    tile_request: torch.Tensor  # [N] int32
    tile_start: torch.Tensor  # [N] int32
    max_query_len: int
    max_seq_len: int
    num_splits: int = 1  # > 1: decode-only, keys split this many ways

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        window: int | None, scale: float,
    ) -> torch.Tensor:
        """Attention of q over the cache, which already holds this step's K/V
        (``rotary_and_cache`` wrote them)."""
        if self.num_splits > 1:
            return split_decode_attention(
                q, k_cache, v_cache, self.block_tables, self.seq_lens, self.max_seq_len,
                self.num_splits, scale, window,
            )
        return paged_attention(
            q, k_cache, v_cache, self.block_tables, self.seq_lens, self.query_start,
            self.tile_request, self.tile_start, self.max_query_len, scale, window,
        )


@dataclass(slots=True)
class KernelBatch:
    input_ids: torch.Tensor  # [T] int32 on the device
    positions: torch.Tensor  # [T] int32
    meta: KernelAttentionMetadata
    sample_rows: torch.Tensor  # [S] int64: flat rows whose logits are sampled
    samplers: list[int]  # the requests (plan indices) those rows belong to


def pad_rows(rows: list[list[int]], width: int, fill: int) -> list[int]:
    """The rows, each padded to ``width`` with ``fill``, concatenated."""
    flat: list[int] = []
    padding = [fill] * width
    for row in rows:
        flat += row
        flat += padding[: width - len(row)]
    return flat


def slot_mapping(tables: torch.Tensor, positions: torch.Tensor, query_lens: torch.Tensor,
                 num_tokens: int, block_size: int) -> torch.Tensor:
    """[T] int64 flat cache slots, computed on the device (no sync: the output
    size is given)."""
    rows = torch.repeat_interleave(
        torch.arange(tables.shape[0], device=tables.device), query_lens, output_size=num_tokens
    )
    pos = positions.long()
    return tables[rows, pos // block_size].long() * block_size + pos % block_size


class StagingBuffer:
    """Pinned host buffers for the per-step upload, two in turn: while one step's
    copy may still be queued behind the step before it (the worker prepares
    step N+1 while N runs), the next upload fills the other buffer. Each buffer
    is refilled only once the copy that last read it has run (its event)."""

    def __init__(self, device: torch.device, size: int = 1 << 16) -> None:
        self.device = device
        self._pin = device.type == "cuda"  # (the CPU path only runs under Triton's interpreter)
        self._buffers = [self._new(size), self._new(size)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def _new(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int32, pin_memory=self._pin)

    def upload_sections(self, sections: list[list[int]]) -> list[torch.Tensor]:
        """Upload several int32 arrays in one copy; each device view starts on a
        16-byte boundary, so Triton's pointer-alignment specialisation sees the
        same alignment every step instead of compiling a variant per offset."""
        flat: list[int] = []
        bounds: list[tuple[int, int]] = []
        for values in sections:
            bounds.append((len(flat), len(values)))
            flat.extend(values)
            flat.extend([0] * (-len(flat) % 4))
        uploaded = self.upload(flat)
        return [uploaded[start : start + n] for start, n in bounds]

    def upload(self, values: list[int]) -> torch.Tensor:
        turn = self._turn
        self._turn ^= 1
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()
        if len(values) > self._buffers[turn].numel():
            self._buffers[turn] = self._new(2 * len(values))
        host = self._buffers[turn][: len(values)]
        # array.array converts a list of ints several times faster than torch.tensor.
        host.copy_(torch.frombuffer(array.array("i", values), dtype=torch.int32))
        if not self._pin:
            return host.clone()
        device_values = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[turn] = event
        return device_values

Feeds = Mapping[str, tuple[torch.Tensor, int]]


@dataclass(slots=True)
class TokenFeed:
    """Input rows of this step whose token is still on the device: after the
    upload, ``apply`` copies them from the in-flight step's sampled ids, so the
    host never waits for them (the stream orders the copy after that step)."""

    rows: list[int] = field(default_factory=list)
    source_rows: list[int] = field(default_factory=list)
    source: torch.Tensor | None = None

    def add(self, row: int, state: RequestState, end: int, feeds: Feeds) -> None:
        """Row ``row`` holds ``state.token_ids[end - 1]``; feed it if pending."""
        if end != len(state.token_ids) or state.token_ids[-1] != PENDING:
            return
        tensor, source_row = feeds[state.request_id]
        if self.source is None:
            self.source = tensor
        # Only the latest step is ever in flight: every feed comes from it.
        assert tensor is self.source, "pending tokens from two steps"
        self.rows.append(row)
        self.source_rows.append(source_row)

    def apply(self, input_ids: torch.Tensor, rows: torch.Tensor, source_rows: torch.Tensor,
              ) -> None:
        if self.source is not None:
            input_ids.index_copy_(0, rows.long(), self.source.index_select(
                0, source_rows.long()).to(input_ids.dtype))


@dataclass(slots=True)
class HostLayout:
    """One step's per-token and per-request int arrays, in plan order, as host
    lists (what both the eager path and the mixed graphs upload)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    query_start: list[int] = field(default_factory=lambda: [0])
    tables: list[list[int]] = field(default_factory=list)
    tile_request: list[int] = field(default_factory=list)
    tile_start: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # flat rows whose logits sample
    samplers: list[int] = field(default_factory=list)  # the requests those rows belong to
    feed: TokenFeed = field(default_factory=TokenFeed)


def host_layout(states: Sequence[RequestState], num_tokens: Sequence[int], block_size: int,
                block_q: int, feeds: Feeds) -> HostLayout:
    """``states[i]`` computes ``num_tokens[i]`` tokens from its ``num_computed``;
    the caller has checked that tokens and block tables cover those positions.
    Query tiles hold ``block_q`` tokens."""
    out = HostLayout()
    for i, (state, n) in enumerate(zip(states, num_tokens, strict=True)):
        start = state.num_computed
        end = start + n
        out.input_ids += state.token_ids[start:end]
        out.feed.add(len(out.input_ids) - 1, state, end, feeds)
        out.positions += range(start, end)
        out.seq_lens.append(end)
        out.query_start.append(out.query_start[-1] + n)
        out.tables.append(state.block_ids[: blocks_for(end, block_size)])
        starts = range(0, n, block_q)
        out.tile_request += [i] * len(starts)
        out.tile_start += starts
        if end == len(state.token_ids):
            out.sample_rows.append(len(out.input_ids) - 1)
            out.samplers.append(i)
    return out


def build_kernel_batch(
    states: Sequence[RequestState], num_tokens: Sequence[int], block_size: int,
    staging: StagingBuffer, num_heads: int, num_kv_heads: int, feeds: Feeds,
) -> KernelBatch:
    """The step's device inputs for the eager fused forward (see ``host_layout``)."""
    max_query_len = max(num_tokens)
    _, block_q = tile_rows(num_heads, num_kv_heads, max_query_len)
    layout = host_layout(states, num_tokens, block_size, block_q, feeds)
    count = len(states)
    width = max(len(row) for row in layout.tables)
    tokens = len(layout.input_ids)
    sections = [layout.input_ids, layout.positions, layout.seq_lens, layout.query_start,
                pad_rows(layout.tables, width, 0), layout.tile_request, layout.tile_start,
                layout.sample_rows, layout.feed.rows, layout.feed.source_rows]
    (ids_t, pos_t, seq_t, qstart_t, tables_t, treq_t, tstart_t, rows_t, feed_t,
     feed_source_t) = staging.upload_sections(sections)
    layout.feed.apply(ids_t, feed_t, feed_source_t)
    tables_t = tables_t.view(count, width)
    query_lens = qstart_t[1:] - qstart_t[:-1]
    max_seq_len = max(layout.seq_lens)
    num_splits = 1
    if (max_query_len == 1 and count * num_kv_heads < SPLIT_BELOW_PROGRAMS
            and max_seq_len >= SPLIT_MIN_CONTEXT):
        # A power of two: the merge kernel reduces over an arange of the splits.
        num_splits = min(16, 1 << (-(-max_seq_len // SPLIT_KEYS) - 1).bit_length())
    meta = KernelAttentionMetadata(
        slot_mapping=slot_mapping(tables_t, pos_t, query_lens, tokens, block_size),
        block_tables=tables_t, seq_lens=seq_t, query_start=qstart_t,
        tile_request=treq_t, tile_start=tstart_t,
        max_query_len=max_query_len, max_seq_len=max_seq_len, num_splits=num_splits,
    )
    return KernelBatch(
        input_ids=ids_t, positions=pos_t, meta=meta, sample_rows=rows_t.long(),
        samplers=layout.samplers,
    )
