"""Paged attention, the pure-torch reference path (CPU and CUDA).

A step's tokens are one flat batch ordered decodes first, then prefill chunks:

    tokens:  [d0 d1 ... d(B-1) | p0 p0 p0 ... | p1 p1 ... ]
              one query each     chunk of req   chunk of req

Decodes (any request computing exactly one token) run as one padded batch: K/V
are gathered block-wise through the block tables into [B, L, kv_heads, head_dim]
and one masked SDPA call serves every decode of the layer. Prefill chunks loop per
request: a chunk starting at position s attends to positions [0, s) already in the
cache plus itself causally.

The step's K/V are written into the cache before attention reads it, so a chunk
finds its own keys there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.worker.kv_cache import storage_view


@dataclass(slots=True)
class PrefillChunk:
    """One request's prefill chunk inside the flat token batch."""

    token_start: int  # index of the chunk's first token in the flat batch
    num_tokens: int
    context_start: int  # position of the chunk's first token (tokens before it are cached)
    block_ids: torch.Tensor  # [ceil((context_start + num_tokens) / block_size)] on device
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor | None:
        """Bool [num_tokens, context_len] (True = attend), None for plain causal."""
        if window in self._masks:
            return self._masks[window]
        n, start = self.num_tokens, self.context_start
        device = self.block_ids.device
        if start == 0 and (window is None or window >= n):
            mask = None
        else:
            query_pos = torch.arange(start, start + n, device=device)[:, None]
            key_pos = torch.arange(start + n, device=device)[None, :]
            mask = key_pos <= query_pos
            if window is not None:
                mask &= key_pos > query_pos - window
        self._masks[window] = mask
        return mask


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs about one step, built once and shared by all layers."""

    block_size: int
    slot_mapping: torch.Tensor  # [T] long: where each token's K/V go in the flat cache
    num_decodes: int
    decode_block_tables: torch.Tensor  # [B, blocks] long, padded with block 0
    decode_context_lens: torch.Tensor  # [B] long: tokens each decode attends to (incl. itself)
    prefills: list[PrefillChunk]
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """Bool [B, 1, 1, L]: which gathered positions each decode attends to."""
        mask = self._decode_masks.get(window)
        if mask is None:
            length = self.decode_block_tables.shape[1] * self.block_size
            key_pos = torch.arange(length, device=self.decode_context_lens.device)[None, :]
            lens = self.decode_context_lens[:, None]
            mask = key_pos < lens
            if window is not None:
                mask &= key_pos >= lens - window
            mask = mask[:, None, None, :]
            self._decode_masks[window] = mask
        return mask


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the step's keys and values [T, kv_heads, head_dim] at their slots, in
    the cache's dtype."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for cache, values in ((k_cache, k), (v_cache, v)):
        storage_view(cache).view(-1, kv_heads, head_dim).index_copy_(
            0, slot_mapping, storage_view(values.to(cache.dtype)))


def _gather(cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Blocks ``blocks`` of one layer's cache, in the model dtype."""
    return storage_view(cache).index_select(0, blocks).view(cache.dtype).to(dtype)


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, window: int | None, scale: float,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    tables = meta.decode_block_tables
    length = tables.shape[1] * block_size
    flat_tables = tables.reshape(-1)
    # [B, L, kv_heads, D] -> [B, kv_heads, L, D]
    keys = _gather(k_cache, flat_tables, q.dtype).view(batch, length, kv_heads, head_dim)
    values = _gather(v_cache, flat_tables, q.dtype).view(batch, length, kv_heads, head_dim)
    # Grouped-query attention without repeating K/V: the query heads that share a
    # KV head become that head's query rows ([B, kv_heads, group, D]); transformers'
    # repeat_kv maps query head h to KV head h // group, which is this layout.
    queries = q.view(batch, kv_heads, num_heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        queries, keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=meta.decode_mask(window), scale=scale,
    )
    return out.reshape(batch, num_heads, head_dim)


def _prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor,
    chunk: PrefillChunk, window: int | None, scale: float,
) -> torch.Tensor:
    n, start = chunk.num_tokens, chunk.context_start
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if start == 0:
        # Nothing earlier is cached: this chunk's own K/V are the whole context.
        keys, values = k, v
    else:
        context = start + n
        keys = _gather(k_cache, chunk.block_ids, q.dtype).view(-1, kv_heads, head_dim)[:context]
        values = _gather(v_cache, chunk.block_ids, q.dtype).view(-1, kv_heads, head_dim)[:context]
    mask = chunk.mask(window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor,
    meta: AttentionMetadata, window: int | None, scale: float,
) -> torch.Tensor:
    """Attention of the step's queries q [T, heads, D] over each request's cached
    context; k and v [T, kv_heads, D] are the step's own, written to the cache first.
    Returns [T, heads, D]."""
    # In the cache's dtype (``to`` is a no-op when it is the model's): a narrower
    # cache's values are written, and the step's own K/V attended, as stored, as
    # the CUDA kernel (which reads everything from the cache) does.
    stored_k, stored_v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    write_kv(k_cache, v_cache, stored_k, stored_v, meta.slot_mapping)
    k, v = stored_k.to(k.dtype), stored_v.to(v.dtype)
    parts: list[torch.Tensor] = []
    decodes = meta.num_decodes
    if decodes:
        parts.append(_decode_attention(q[:decodes], k_cache, v_cache, meta, window, scale))
    for chunk in meta.prefills:
        span = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        parts.append(
            _prefill_attention(q[span], k[span], v[span], k_cache, v_cache, chunk, window, scale)
        )
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
