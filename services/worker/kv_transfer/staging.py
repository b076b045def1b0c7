"""Blocks of a ``PagedKVCache`` into contiguous host staging and back.

The cache is layer-major (``[layers, blocks, block_size, kv_heads, head_dim]`` per K
and V), so one block is ``2 * layers`` strided pieces; the wire wants one
contiguous buffer per chunk:

    staged chunk: [2 (K, V), layers, count, block_size, kv_heads, head_dim]

Both calls block the calling thread (the engine runs them in a worker thread, never
on the event loop). On CUDA every copy runs on a side stream and the calling
thread waits on that stream's event: the step stream is never synchronized, and
steps keep launching while a chunk is staged.

- ``gather`` (sender): the side stream first waits for the work already queued on
  the step stream (earlier steps wrote these blocks), gathers the blocks on the
  device, then copies them into pinned host memory, non-blocking.
- ``scatter`` (receiver): the received frame is copied into pinned memory, goes up
  non-blocking and is written into the destination blocks on the side stream.
  Only the destination blocks are written; no step reads them before the transfer
  is reported done, by which time the side stream's event has completed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from services.worker.kv_cache import PagedKVCache
from shared.protocol.transfer import KvBlockLayout

# torch warns that a read-only buffer (a received ZMQ frame) could be written
# through the tensor; scatter only ever reads from it.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class BlockStager:
    """Stages blocks of one cache for the wire (``gather``) and writes received
    blocks into it (``scatter``)."""

    def __init__(self, cache: PagedKVCache) -> None:
        # Blocks move as raw bytes (``storage_view``); the layout names the real
        # dtype, so workers whose caches differ in it refuse each other's blocks.
        self._k, self._v = cache.raw_k, cache.raw_v
        layers, _, block_size, kv_heads, head_dim = self._k.shape
        self.device = self._k.device
        self.dtype = self._k.dtype
        self.layout = KvBlockLayout(layers, block_size, kv_heads, head_dim,
                                    str(cache.dtype).removeprefix("torch."))
        self.block_bytes = PagedKVCache.bytes_per_block(layers, block_size, kv_heads,
                                                        head_dim, cache.dtype)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None

    def _shape(self, count: int) -> tuple[int, ...]:
        layers, _, *rest = self._k.shape
        return (2, layers, count, *rest)

    def _index(self, blocks: list[int]) -> torch.Tensor:
        return torch.tensor(blocks, dtype=torch.long, device=self.device)

    def gather(self, blocks: list[int]) -> torch.Tensor:
        """Blocks ``blocks`` as one contiguous host tensor (pinned on CUDA)."""
        staged = torch.empty(self._shape(len(blocks)), dtype=self.dtype, pin_memory=self._cuda)
        if self._stream is None:
            index = self._index(blocks)
            torch.index_select(self._k, 1, index, out=staged[0])
            torch.index_select(self._v, 1, index, out=staged[1])
            return staged
        with self.side_stream() as stream:
            staged.copy_(self.gather_on_device(blocks), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        copied.synchronize()  # this thread waits; the step stream does not
        return staged

    def scatter(self, blocks: list[int], payload: memoryview) -> None:
        """Write the received blocks (``payload`` as ``gather`` staged them) into
        ``blocks``. The caller checked the payload's size."""
        received = torch.frombuffer(payload, dtype=self.dtype).view(self._shape(len(blocks)))
        if self._stream is None:
            index = self._index(blocks)
            self._k.index_copy_(1, index, received[0])
            self._v.index_copy_(1, index, received[1])
            return
        pinned = torch.empty(received.shape, dtype=self.dtype, pin_memory=True)
        pinned.copy_(received)
        with self.side_stream() as stream:
            self.write_on_device(blocks, pinned.to(self.device, non_blocking=True))
            written = torch.cuda.Event()
            written.record(stream)
        written.synchronize()  # pinned may be freed only after the upload

    # ---- CUDA only: what the host path and the NCCL path (nccl.py) share ----------

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[torch.cuda.Stream]:
        """The stager's CUDA stream as the current one, after the work already
        queued on the step stream (earlier steps' K/V writes land first)."""
        assert self._stream is not None, "side_stream is for a CUDA cache"
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield self._stream

    def gather_on_device(self, blocks: list[int]) -> torch.Tensor:
        """The blocks as one contiguous device tensor (inside ``side_stream``)."""
        index = self._index(blocks)
        return torch.stack((self._k.index_select(1, index), self._v.index_select(1, index)))

    def write_on_device(self, blocks: list[int], staged: torch.Tensor) -> None:
        """Write a device tensor shaped as ``gather_on_device``'s into ``blocks``
        (inside ``side_stream``)."""
        index = self._index(blocks)
        self._k.index_copy_(1, index, staged[0])
        self._v.index_copy_(1, index, staged[1])

    def empty_on_device(self, count: int) -> torch.Tensor:
        return torch.empty(self._shape(count), dtype=self.dtype, device=self.device)
