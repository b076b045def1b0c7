"""CUDA graphs for decode-only steps.

A decode step of a small model is launch-bound: hundreds of small kernels whose
launch costs more host time than they take on the GPU. Each batch-size bucket's
forward pass is captured once at start-up and replayed with one launch.

A graph reads fixed addresses, so every input lives in static buffers sized for
the largest bucket, and a step of ``n`` requests runs the graph of the smallest
bucket ``b >= n`` with rows ``n..b-1`` padded: each padded row decodes token 0 at
position 0 into a scratch block no request owns (the cache keeps one spare block
for this), so padding never touches real K/V.

    static int32 buffers:  input_ids [B]  positions [B]  seq_lens [B]
                           block_tables [B, max_blocks_per_request]
    fixed at capture:      query_start = 0..B, one tile per request

Only the columns a step uses are refilled in ``block_tables``; the kernel never
reads past a request's ``seq_lens``, so stale columns are harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from services.worker.kernel_batch import (
    Feeds,
    KernelAttentionMetadata,
    StagingBuffer,
    host_layout,
    pad_rows,
    slot_mapping,
)
from services.worker.step_batch import RequestState


def graph_buckets(max_batch: int) -> list[int]:
    """vLLM's ladder: 1, 2, 4, then every 8 up to ``max_batch``."""
    sizes = [1, 2, 4, *range(8, max_batch + 1, 8)]
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


def capture_graphs(
    device: torch.device, sizes: list[int], forward_at: Callable[[int], torch.Tensor],
    prepare: Callable[[int], None] = lambda size: None,
) -> dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
    """One graph per size of ``forward_at(size)``, sharing one memory pool.

    Warm-up runs come first, on a side stream outside capture: two at the largest
    size, then one at each size just before its capture. They compile the Triton
    variants and let the allocator and cuBLAS settle workspaces and pick
    algorithms for that shape (a shape cuBLAS first meets inside a capture can fail
    it: a float32 GEMM of one row did). Graphs are captured largest first so the
    smaller ones reuse the pool's blocks. ``prepare(size)`` runs before each
    capture, outside it (what it writes to the static buffers is not replayed).
    """
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)

    def warm_up(size: int, runs: int) -> None:
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode():
            prepare(size)
            for _ in range(runs):
                forward_at(size)
        torch.cuda.current_stream(device).wait_stream(stream)

    warm_up(sizes[-1], 2)
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
    for size in reversed(sizes):
        warm_up(size, 1)
        prepare(size)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
            graphs[size] = (graph, forward_at(size))
    torch.cuda.synchronize(device)
    return graphs


Forward = Callable[[torch.Tensor, torch.Tensor, KernelAttentionMetadata], torch.Tensor]


class GraphSet:
    """Forwards captured once per size over static input buffers (which the
    subclass owns and ``_forward_at`` reads). On a device without CUDA graphs
    (the CPU under Triton's interpreter, in tests) ``_replay`` runs the forward
    on the same buffers instead, so the layouts are testable anywhere."""

    def __init__(self, forward: Forward, device: torch.device, sizes: list[int]) -> None:
        self.device = device
        self.sizes = sizes
        self._forward = forward
        self._staging = StagingBuffer(device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward_at(self, size: int) -> torch.Tensor:
        raise NotImplementedError

    def _prepare(self, size: int) -> None:
        """Static-buffer state the capture at ``size`` needs (outside the graph)."""

    def _capture(self) -> None:
        if self.device.type == "cuda":
            self._graphs = capture_graphs(self.device, self.sizes, self._forward_at,
                                          self._prepare)

    def _replay(self, size: int) -> torch.Tensor:
        if size not in self._graphs:
            return self._forward_at(size)
        graph, out = self._graphs[size]
        graph.replay()
        return out


class DecodeGraphs(GraphSet):
    """Captured decode forwards, one per bucket; ``run`` returns the hidden states
    of the step's rows (the graph's output buffer, valid until the next run)."""

    def __init__(self, forward: Forward, device: torch.device, max_batch: int,
                 max_blocks: int, block_size: int, scratch_block: int) -> None:
        super().__init__(forward, device, graph_buckets(max_batch))
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = self.sizes
        self.max_batch = self.buckets[-1]
        int32 = {"dtype": torch.int32, "device": device}
        b = self.max_batch
        self._input_ids = torch.zeros(b, **int32)
        self._positions = torch.zeros(b, **int32)
        self._seq_lens = torch.ones(b, **int32)
        self._tables = torch.full((b, max_blocks), scratch_block, **int32)
        self._query_start = torch.arange(b + 1, **int32)
        self._tiles = torch.arange(b, **int32)
        self._tile_start = torch.zeros(b, **int32)
        self._capture()

    def _meta(self, batch: int) -> KernelAttentionMetadata:
        tables = self._tables[:batch]
        ones = self._query_start[1 : batch + 1] - self._query_start[:batch]
        return KernelAttentionMetadata(
            slot_mapping=slot_mapping(tables, self._positions[:batch], ones, batch,
                                      self.block_size),
            block_tables=tables, seq_lens=self._seq_lens[:batch],
            query_start=self._query_start[: batch + 1],
            tile_request=self._tiles[:batch], tile_start=self._tile_start[:batch],
            max_query_len=1, max_seq_len=0,
        )

    def _forward_at(self, batch: int) -> torch.Tensor:
        return self._forward(self._input_ids[:batch], self._positions[:batch], self._meta(batch))

    def bucket(self, batch: int) -> int | None:
        """The graph a decode step of ``batch`` requests would run, if any."""
        if batch > self.max_batch:
            return None
        return next(b for b in self.buckets if b >= batch)

    def run(self, states: Sequence[RequestState], feeds: Feeds
            ) -> tuple[list[int], torch.Tensor]:
        """Decode one token for each of ``states``: (the requests that sample, in plan
        order; their final hidden states)."""
        count = len(states)
        bucket = self.bucket(count)
        assert bucket is not None, f"no graph for a batch of {count}"
        layout = host_layout(states, [1] * count, self.block_size, 1, feeds)
        pad = bucket - count
        width = max(len(row) for row in layout.tables)
        ids_t, pos_t, seq_t, tables_t, feed_t, feed_source_t, rows_t = (
            self._staging.upload_sections([
                layout.input_ids + [0] * pad,
                layout.positions + [0] * pad,
                layout.seq_lens + [1] * pad,
                pad_rows(layout.tables, width, self.scratch_block)
                + [self.scratch_block] * (width * pad),
                layout.feed.rows,
                layout.feed.source_rows,
                layout.sample_rows,
            ]))
        self._input_ids[:bucket].copy_(ids_t)
        layout.feed.apply(self._input_ids, feed_t, feed_source_t)
        self._positions[:bucket].copy_(pos_t)
        self._seq_lens[:bucket].copy_(seq_t)
        self._tables[:bucket, :width].copy_(tables_t.view(bucket, width))
        hidden = self._replay(bucket)
        if len(layout.samplers) < count:
            # A 1-token prefill chunk short of the prompt's end: no logits for it.
            return layout.samplers, hidden.index_select(0, rows_t.long())
        return layout.samplers, hidden[:count]
