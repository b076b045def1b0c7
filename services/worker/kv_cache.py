"""The paged KV cache: per layer one K and one V tensor of fixed-size blocks.

    k[layer]: [num_blocks, block_size, kv_heads, head_dim]

A request's token at position p lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``; flattened, that is slot
``block_table[p // block_size] * block_size + p % block_size``. Which blocks a
request owns is decided elsewhere (kvcache + scheduler); the worker only reads and
writes the slots the plan's block tables point at.

The cache may hold K/V in a narrower type than the model computes in
(``kv_cache_dtype=fp8``: float8 e4m3, vLLM's ``--kv-cache-dtype fp8``): half the
bytes of bf16, so twice the blocks in the same memory and half the bytes read
per decode. Values are stored unscaled, as vLLM does without calibrated scales
(K and V of Llama-family models sit well inside e4m3's +-448; larger ones
saturate). torch has no CPU kernels for indexing FP8 tensors, so the cache's
moves (COW copies, swaps, transfers, the reference path's writes) go through a
``uint8`` view of the same bytes: ``storage_view``.
"""

from __future__ import annotations

import torch

from services.worker.device import FP8


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor every copy and index kernel handles: FP8 as uint8 (one
    byte each, same shape), other types as they are."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Zeroed, not empty: padded decode batches read slots no request wrote, and
        # masked-out garbage that happens to be NaN would still poison softmax @ V.
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self._k = torch.zeros(shape, device=device, dtype=dtype)
        self._v = torch.zeros(shape, device=device, dtype=dtype)
        self.k: list[torch.Tensor] = list(self._k.unbind(0))
        self.v: list[torch.Tensor] = list(self._v.unbind(0))
        # All layers' K and V as ``storage_view``s, for moving whole blocks.
        self.raw_k = storage_view(self._k)
        self.raw_v = storage_view(self._v)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy blocks ``src[j]`` into ``dst[j]`` in every layer, K and V
        (copy-on-write before a step writes into a block it no longer shares).
        One indexed copy per tensor, whatever the number of blocks."""
        if not src:
            return
        device = self._k.device
        src_t = torch.tensor(src, dtype=torch.long, device=device)
        dst_t = torch.tensor(dst, dtype=torch.long, device=device)
        # Layer-major storage: blocks are dim 1.
        self.raw_k[:, dst_t] = self.raw_k[:, src_t]
        self.raw_v[:, dst_t] = self.raw_v[:, src_t]


class HostKVStore:
    """The host tier: KV blocks swapped out of a ``PagedKVCache``, block-major
    (``[blocks, 2 (K, V), layers, block_size, kv_heads, head_dim]``) so each host
    block is one contiguous region. Pinned memory on CUDA, so the copies run
    asynchronously on a side stream; plain CPU tensors elsewhere (still a real copy).

    The scheduler sizes the tier (``resize``); storage grows lazily (to the next
    power of two over the highest block used, capped at the size), so a large host
    budget costs memory only once swapping happens.
    """

    def __init__(self, device_cache: PagedKVCache) -> None:
        self.cache = device_cache
        self.num_blocks = 0
        self.device = device_cache.raw_k.device
        self._pin = self.device.type == "cuda"
        self._blocks = self._empty(0)
        self._stream = torch.cuda.Stream(self.device) if self._pin else None

    def _empty(self, blocks: int) -> torch.Tensor:
        layers, _, *rest = self.cache.raw_k.shape
        return torch.zeros((blocks, 2, layers, *rest), dtype=self.cache.raw_k.dtype,
                           pin_memory=self._pin)

    @property
    def allocated_blocks(self) -> int:
        return self._blocks.shape[0]

    def resize(self, num_blocks: int) -> None:
        """The tier holds ``num_blocks`` now; blocks below it keep their contents."""
        self.num_blocks = num_blocks
        if self.allocated_blocks > num_blocks:
            self._reallocate(num_blocks)

    def _ensure(self, highest: int) -> None:
        if highest < self.allocated_blocks:
            return
        size = 1
        while size <= highest:
            size *= 2
        self._reallocate(min(size, self.num_blocks))

    def _reallocate(self, blocks: int) -> None:
        if self._stream is not None:
            self._stream.synchronize()  # no copy may still target the old storage
        fresh = self._empty(blocks)
        keep = min(blocks, self.allocated_blocks)
        fresh[:keep] = self._blocks[:keep]
        self._blocks = fresh

    def swap(self, out_src: list[int], out_dst: list[int],
             in_src: list[int], in_dst: list[int]) -> None:
        """Swap-outs (device -> host) then swap-ins (host -> device): a device block
        swapped out may be the destination of a swap-in in the same step. On CUDA
        the copies run on a side stream and the compute stream waits on its event,
        so neither the host nor earlier compute waits on them."""
        if not out_src and not in_src:
            return
        self._ensure(max((*out_dst, *in_src)))
        if self._stream is None:
            self._copy(out_src, out_dst, in_src, in_dst)
            return
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)  # earlier steps' K/V writes land first
        with torch.cuda.stream(self._stream):
            self._copy(out_src, out_dst, in_src, in_dst)
            done = torch.cuda.Event()
            done.record(self._stream)
        compute.wait_event(done)

    def _copy(self, out_src: list[int], out_dst: list[int],
              in_src: list[int], in_dst: list[int]) -> None:
        k, v, host = self.cache.raw_k, self.cache.raw_v, self._blocks
        # One copy per block and tensor: the host side is contiguous, so each is a
        # single asynchronous transfer from pinned memory.
        for src, dst in zip(out_src, out_dst, strict=True):
            host[dst, 0].copy_(k[:, src], non_blocking=self._pin)
            host[dst, 1].copy_(v[:, src], non_blocking=self._pin)
        for src, dst in zip(in_src, in_dst, strict=True):
            k[:, dst].copy_(host[src, 0], non_blocking=self._pin)
            v[:, dst].copy_(host[src, 1], non_blocking=self._pin)
