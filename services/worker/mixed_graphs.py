"""CUDA graphs for mixed steps (prefill chunks with or without decodes).

Eagerly, a step of a 16-layer model launches about 150 kernels from Python, and
on the GPU host's CPU each launch costs 50-70 µs: a mixed step spent ~9 ms
launching work the GPU finished in far less. A graph per token-count bucket
replays the whole forward with one launch, whatever the step's layout, because
the layout lives in device buffers the graph reads, not in its shape:

    static buffers (R = max requests, one spare "padding request" after them)
      input_ids [T]  positions [T]            padded to the bucket's T
      query_start [R + 3]  seq_lens [R + 2]   entries past the step's requests: the
                                              padding request owns the padded tokens
                                              (its table row is the scratch block), the
                                              rest own nothing
      block_tables [R + 1, max_blocks]
      tile_request / tile_start [T // Q + R + 1]  padded with a request that has no
                                              queries and no keys: those programs exit

Attention always runs with the prefill tile size (a decode's tile wastes rows,
not bandwidth: each tile still reads its request's K/V once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.worker.cuda_graphs import Forward, GraphSet
from services.worker.kernel_batch import (
    Feeds,
    KernelAttentionMetadata,
    host_layout,
    pad_rows,
    slot_mapping,
)
from services.worker.kernels.paged_attention import tile_rows
from services.worker.step_batch import RequestState

# Any query run longer than a decode: selects the kernel's prefill tile size.
CHUNK_QUERY_LEN = 1 << 20


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts graphs are captured for: fine steps while small, then every
    256 (padding wastes at most ~1/8 of a large step)."""
    sizes = [16, 32, 64, 128, 256, 384, 512, 768, *range(1024, max_tokens + 1, 256)]
    return sorted({s for s in sizes if s <= max_tokens} | {max_tokens})


class MixedGraphs(GraphSet):
    """Captured forwards for steps of up to ``max_tokens`` tokens and
    ``max_requests`` requests; ``run`` returns hidden states of every token row
    (the padded bucket's; the caller picks the rows it samples)."""

    def __init__(self, forward: Forward, device: torch.device, max_tokens: int,
                 max_requests: int, max_blocks: int, block_size: int, scratch_block: int,
                 num_heads: int, num_kv_heads: int) -> None:
        super().__init__(forward, device, token_buckets(max_tokens))
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_requests = max_requests
        self.buckets = self.sizes
        _, self.block_q = tile_rows(num_heads, num_kv_heads, CHUNK_QUERY_LEN)
        int32 = {"dtype": torch.int32, "device": device}
        tokens, requests = self.buckets[-1], max_requests
        self._input_ids = torch.zeros(tokens, **int32)
        self._positions = torch.zeros(tokens, **int32)
        # Request slots 0..R + 1: the step's requests, then the padding request
        # (owns the padded tokens), then slots that own nothing (slot R + 1 always
        # does: padded tiles point there). At rest slot 0 pads every token.
        self._query_start = torch.full((requests + 3,), tokens, **int32)
        self._query_start[0] = 0
        self._seq_lens = torch.zeros(requests + 2, **int32)
        self._tables = torch.full((requests + 1, max_blocks), scratch_block, **int32)
        tiles = self._num_tiles(tokens)
        self._tile_request = torch.full((tiles,), requests + 1, **int32)
        self._tile_start = torch.zeros(tiles, **int32)
        self._capture()

    def _num_tiles(self, tokens: int) -> int:
        # Each request wastes at most one partly filled tile.
        return tokens // self.block_q + self.max_requests + 1

    def _meta(self, tokens: int) -> KernelAttentionMetadata:
        query_lens = self._query_start[1:] - self._query_start[:-1]
        tiles = self._num_tiles(tokens)
        return KernelAttentionMetadata(
            slot_mapping=slot_mapping(self._tables, self._positions[:tokens],
                                      query_lens[:-1], tokens, self.block_size),
            block_tables=self._tables, seq_lens=self._seq_lens,
            query_start=self._query_start,
            tile_request=self._tile_request[:tiles], tile_start=self._tile_start[:tiles],
            max_query_len=CHUNK_QUERY_LEN, max_seq_len=0,
        )

    def _prepare(self, tokens: int) -> None:
        """At rest (capture and warm-up) the padding request owns ``tokens``."""
        self._query_start[1:].fill_(tokens)

    def _forward_at(self, tokens: int) -> torch.Tensor:
        return self._forward(self._input_ids[:tokens], self._positions[:tokens],
                             self._meta(tokens))

    def bucket(self, num_requests: int, num_tokens: int) -> int | None:
        """The graph a step of this size would run, if any."""
        if num_requests > self.max_requests or num_tokens > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= num_tokens)

    def run(self, states: Sequence[RequestState], num_tokens: Sequence[int], feeds: Feeds,
            ) -> tuple[list[int], torch.Tensor]:
        """Compute the step: (the requests that sample, in plan order; their final
        hidden states)."""
        count = len(states)
        total = sum(num_tokens)
        bucket = self.bucket(count, total)
        assert bucket is not None, f"no graph for {count} requests and {total} tokens"
        layout = host_layout(states, num_tokens, self.block_size, self.block_q, feeds)
        requests = self.max_requests
        pad = bucket - total
        # The padding request (index ``count``) owns the padded tokens; the rest none.
        query_start = layout.query_start + [bucket] * (requests + 2 - count)
        tiles = self._num_tiles(bucket)
        tables = [*layout.tables, [self.scratch_block]]
        width = max(len(row) for row in tables)
        sections = [
            layout.input_ids + [0] * pad,
            layout.positions + [0] * pad,
            layout.seq_lens + [0] * (requests + 2 - count),
            query_start,
            pad_rows(tables, width, self.scratch_block),
            layout.tile_request + [requests + 1] * (tiles - len(layout.tile_request)),
            layout.tile_start + [0] * (tiles - len(layout.tile_start)),
            layout.sample_rows,
            layout.feed.rows,
            layout.feed.source_rows,
        ]
        ids_t, pos_t, seq_t, qs_t, tables_t, treq_t, tstart_t, rows_t, feed_t, feed_source_t = (
            self._staging.upload_sections(sections))
        self._input_ids[:bucket].copy_(ids_t)
        layout.feed.apply(self._input_ids, feed_t, feed_source_t)
        self._positions[:bucket].copy_(pos_t)
        self._seq_lens.copy_(seq_t)
        self._query_start.copy_(qs_t)
        self._tables[: count + 1, :width].copy_(tables_t.view(count + 1, width))
        self._tile_request[:tiles].copy_(treq_t)
        self._tile_start[:tiles].copy_(tstart_t)
        hidden = self._replay(bucket)
        return layout.samplers, hidden.index_select(0, rows_t.long())
