"""The paged KV cache: per layer one K and one V tensor of fixed-size blocks.

    k[layer]: [num_blocks, block_size, kv_heads, head_dim]

A request's token at position p lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``; flattened, that is slot
``block_table[p // block_size] * block_size + p % block_size``. Which blocks a
request owns is decided elsewhere (kvcache + scheduler); the worker only reads and
writes the slots the plan's block tables point at.
"""

from __future__ import annotations

import torch


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
        self._k = torch.zeros(shape, device=device, dtype=dtype)
        self._v = torch.zeros(shape, device=device, dtype=dtype)
        self.k: list[torch.Tensor] = list(self._k.unbind(0))
        self.v: list[torch.Tensor] = list(self._v.unbind(0))

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
        self._k[:, dst_t] = self._k[:, src_t]
        self._v[:, dst_t] = self._v[:, src_t]
