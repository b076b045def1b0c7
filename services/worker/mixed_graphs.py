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

from services.worker.cuda_graphs import Forward
from services.worker.kernel_batch import (
    KernelAttentionMetadata,
    StagingBuffer,
    pad_rows,
    slot_mapping,
)
from services.worker.kernels.paged_attention import tile_rows
from services.worker.step_batch import RequestState, blocks_for

# Any query run longer than a decode: selects the kernel's prefill tile size.
CHUNK_QUERY_LEN = 1 << 20


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts graphs are captured for: fine steps while small, then every
    256 (padding wastes at most ~1/8 of a large step)."""
    sizes = [16, 32, 64, 128, 256, 384, 512, 768, *range(1024, max_tokens + 1, 256)]
    return sorted({s for s in sizes if s <= max_tokens} | {max_tokens})


class MixedGraphs:
    """Captured forwards for steps of up to ``max_tokens`` tokens and
    ``max_requests`` requests; ``run`` returns hidden states of every token row
    (the padded bucket's; the caller picks the rows it samples)."""

    def __init__(self, forward: Forward, device: torch.device, max_tokens: int,
                 max_requests: int, max_blocks: int, block_size: int, scratch_block: int,
                 num_heads: int, num_kv_heads: int) -> None:
        self.device = device
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_requests = max_requests
        self.buckets = token_buckets(max_tokens)
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
        self._staging = StagingBuffer(device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._forward = forward
        if device.type == "cuda":
            self._capture(forward)
        # Elsewhere (the CPU under Triton's interpreter, in tests) ``run`` calls the
        # forward on the same static buffers instead of replaying a graph.

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

    def _set_tokens(self, tokens: int) -> None:
        """At rest (capture and warm-up) the padding request owns ``tokens``."""
        self._query_start[1:].fill_(tokens)

    def _capture(self, forward: Forward) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        largest = self.buckets[-1]
        with torch.cuda.stream(stream), torch.inference_mode():
            self._set_tokens(largest)
            for _ in range(2):  # compiles the prefill kernel variants outside capture
                forward(self._input_ids, self._positions, self._meta(largest))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for tokens in reversed(self.buckets):
            self._set_tokens(tokens)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                hidden = forward(self._input_ids[:tokens], self._positions[:tokens],
                                 self._meta(tokens))
            self._graphs[tokens] = (graph, hidden)
        torch.cuda.synchronize(self.device)

    def _replay(self, tokens: int) -> torch.Tensor:
        if tokens not in self._graphs:
            return self._forward(self._input_ids[:tokens], self._positions[:tokens],
                                 self._meta(tokens))
        graph, hidden = self._graphs[tokens]
        graph.replay()
        return hidden

    def bucket(self, num_requests: int, num_tokens: int) -> int | None:
        """The graph a step of this size would run, if any."""
        if num_requests > self.max_requests or num_tokens > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= num_tokens)

    def run(self, states: Sequence[RequestState], num_tokens: Sequence[int]
            ) -> tuple[torch.Tensor, list[int], list[int]]:
        """Compute the step; (hidden states of the bucket's rows, the rows that
        sample, the requests they belong to in plan order)."""
        count = len(states)
        total = sum(num_tokens)
        bucket = self.bucket(count, total)
        assert bucket is not None, f"no graph for {count} requests and {total} tokens"
        block_q = self.block_q
        ids: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        tile_request: list[int] = []
        tile_start: list[int] = []
        sample_rows: list[int] = []
        samplers: list[int] = []
        for i, (state, n) in enumerate(zip(states, num_tokens, strict=True)):
            start = state.num_computed
            end = start + n
            ids += state.token_ids[start:end]
            positions += range(start, end)
            seq_lens.append(end)
            tables.append(state.block_ids[: blocks_for(end, self.block_size)])
            starts = range(0, n, block_q)
            tile_request += [i] * len(starts)
            tile_start += starts
            if end == len(state.token_ids):
                sample_rows.append(len(ids) - 1)
                samplers.append(i)
        requests = self.max_requests
        pad = bucket - total
        query_start = [0] * (count + 1)
        for i, n in enumerate(num_tokens):
            query_start[i + 1] = query_start[i] + n
        # The padding request (index ``count``) owns the padded tokens; the rest none.
        query_start += [bucket] * (requests + 2 - count)
        tiles = self._num_tiles(bucket)
        width = max(len(row) for row in tables)
        tables.append([self.scratch_block])
        sections = [
            ids + [0] * pad,
            positions + [0] * pad,
            seq_lens + [0] * (requests + 2 - count),
            query_start,
            pad_rows(tables, width, self.scratch_block),
            tile_request + [requests + 1] * (tiles - len(tile_request)),
            tile_start + [0] * (tiles - len(tile_start)),
            sample_rows,
        ]
        ids_t, pos_t, seq_t, qs_t, tables_t, treq_t, tstart_t, rows_t = (
            self._staging.upload_sections(sections))
        self._input_ids[:bucket].copy_(ids_t)
        self._positions[:bucket].copy_(pos_t)
        self._seq_lens.copy_(seq_t)
        self._query_start.copy_(qs_t)
        self._tables[: count + 1, :width].copy_(tables_t.view(count + 1, width))
        self._tile_request[:tiles].copy_(treq_t)
        self._tile_start[:tiles].copy_(tstart_t)
        hidden = self._replay(bucket)
        return hidden.index_select(0, rows_t.long()), sample_rows, samplers
