"""The CUDA compute path of a step: fused Triton forward, CUDA graphs for decode.

``ModelRunner`` owns request state and plan checks; this owns how a checked
step's tokens become hidden states on the GPU:

- a decode-only step whose batch fits a captured bucket replays that bucket's
  graph (``cuda_graphs.py``);
- a step with prefill chunks whose token count fits a bucket replays a mixed
  graph (``mixed_graphs.py``);
- anything larger (or long-context decodes of a small batch, which split their
  keys) runs the fused forward eagerly over one ``KernelBatch``
  (``kernel_batch.py``).

Both read their inputs from one pinned upload per step, so the host never waits
on the GPU until the sampled ids come back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.worker.cuda_graphs import DecodeGraphs
from services.worker.kernel_batch import (
    SPLIT_BELOW_PROGRAMS,
    Feeds,
    StagingBuffer,
    build_kernel_batch,
)
from services.worker.kv_cache import PagedKVCache
from services.worker.mixed_graphs import MixedGraphs
from services.worker.models.llama import LlamaModel
from services.worker.models.llama_fused import fused_forward
from services.worker.step_batch import RequestState, blocks_for

# Longest context a small decode batch still runs in a graph (unsplit); past it the
# eager split-KV path is faster despite its launch overhead.
GRAPH_MAX_SPLIT_FREE_CONTEXT = 8192


class CudaStep:
    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, block_size: int,
                 max_model_len: int, graph_max_batch: int, scratch_block: int,
                 graph_max_tokens: int = 0) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self._staging = StagingBuffer(model.device)
        self.graphs: DecodeGraphs | None = None
        self.mixed: MixedGraphs | None = None
        max_blocks = blocks_for(max_model_len, block_size)
        if graph_max_batch > 0:
            self.graphs = DecodeGraphs(
                self._graph_forward, model.device, graph_max_batch, max_blocks, block_size,
                scratch_block,
            )
        if graph_max_batch > 0 and graph_max_tokens > 0:
            c = model.config
            self.mixed = MixedGraphs(
                self._graph_forward, model.device, graph_max_tokens, graph_max_batch,
                max_blocks, block_size, scratch_block, c.num_heads, c.num_kv_heads,
            )

    def _graph_forward(self, input_ids, positions, meta):  # type: ignore[no-untyped-def]
        return fused_forward(self.model, input_ids, positions, meta, self.kv_cache)

    def _graph_fits(self, states: Sequence[RequestState], num_tokens: Sequence[int]) -> bool:
        if self.graphs is None or not all(n == 1 for n in num_tokens):
            return False
        if not self.graphs.bucket(len(states)):
            return False
        # A few decodes over long contexts leave most of the GPU idle in the graph's
        # one-program-per-head kernel; the eager path splits their keys instead.
        few = len(states) * self.model.config.num_kv_heads < SPLIT_BELOW_PROGRAMS
        return not (few and max(s.num_computed for s in states) >= GRAPH_MAX_SPLIT_FREE_CONTEXT)

    def hidden_states(
        self, states: Sequence[RequestState], num_tokens: Sequence[int], feeds: Feeds,
        extra_rows: Sequence[int] = (),
    ) -> tuple[list[int], torch.Tensor]:
        """(the requests that sample, in plan order; their final hidden states, then
        those of ``extra_rows``: flat rows in plan order, request i's tokens from
        ``sum(num_tokens[:i])``). Extra rows (prompt logprobs) run the step eagerly:
        the graphs keep only the sampled rows."""
        if extra_rows:
            return self._eager(states, num_tokens, feeds, extra_rows)
        if self._graph_fits(states, num_tokens):
            assert self.graphs is not None
            return self.graphs.run(states, feeds)
        if self.mixed is not None and self.mixed.bucket(len(states), sum(num_tokens)):
            return self.mixed.run(states, num_tokens, feeds)
        return self._eager(states, num_tokens, feeds, extra_rows)

    def _eager(self, states: Sequence[RequestState], num_tokens: Sequence[int], feeds: Feeds,
               extra_rows: Sequence[int]) -> tuple[list[int], torch.Tensor]:
        c = self.model.config
        batch = build_kernel_batch(states, num_tokens, self.block_size, self._staging,
                                   c.num_heads, c.num_kv_heads, feeds)
        rows = batch.sample_rows
        if extra_rows:
            rows = torch.cat([rows, torch.tensor(list(extra_rows), dtype=torch.long).to(
                rows.device, non_blocking=True)])
        hidden = fused_forward(self.model, batch.input_ids, batch.positions, batch.meta,
                               self.kv_cache, rows)
        return batch.samplers, hidden
