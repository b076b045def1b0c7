"""Paged attention for a whole mixed step in one Triton launch per layer.

One step's queries are a flat batch of variable-length runs, one per request
(a prefill chunk of many tokens, or a decode of one). Request ``r`` owns query
rows ``[query_start[r], query_start[r + 1])``; after this step's K/V are written
it has ``seq_lens[r]`` positions in the cache, so its first query sits at
position ``seq_lens[r] - (query_start[r + 1] - query_start[r])``. Keys are read
through the request's block table, page by page::

    key position p  ->  block_tables[r, p // PAGE] * PAGE + p % PAGE  (a cache slot)

The grid is (query tiles, KV heads). A tile is ``BLOCK_M`` rows: ``BLOCK_M //
GROUP`` consecutive query tokens of one request times the ``GROUP`` query heads
that share the program's KV head (grouped-query attention), so each K/V tile is
loaded once for all heads of its group. Tiles are listed on the host per step
(``tile_request``, ``tile_start``); a decode-only step has one tile per request
and the lists never change, which is what lets a CUDA graph capture the launch.

Softmax is computed online in float32 (running max and sum per row), causal and
optionally sliding-window masked. A decode over a long context can instead be
split along the keys (``num_splits`` > 1): each split writes its partial max,
sum and output, and a second small kernel merges them, so a batch of few long
decodes still fills the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
    req, q_begin, q_len, ctx_before, q_local0, kv_head, kv_lo, kv_hi,
    stride_q_tok, stride_q_head,
    stride_block, stride_slot, stride_head,
    stride_bt, qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax attention of one query tile over keys [kv_lo, kv_hi).
    Returns (acc, running max in log2 units, running sum) per row."""
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_local0 + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = q_idx < q_len
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (q_begin + q_idx)[:, None] * stride_q_tok + head[:, None] * stride_q_head
        + d[None, :],
        mask=row_valid[:, None], other=0.0,
    )
    q_pos = ctx_before + q_idx
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_valid = keys < kv_hi
        page = tl.load(block_tables_ptr + req * stride_bt + keys // PAGE, mask=k_valid, other=0)
        slot = keys % PAGE
        k = tl.load(
            k_cache_ptr + page[:, None] * stride_block + slot[:, None] * stride_slot
            + kv_head * stride_head + d[None, :],
            mask=k_valid[:, None], other=0.0,
        ).to(q_ptr.dtype.element_ty)  # an FP8 cache is widened to the model dtype
        # qk_scale carries log2(e): the softmax below uses exp2.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = (keys[None, :] <= q_pos[:, None]) & k_valid[None, :]
        if HAS_WINDOW:
            visible = visible & (keys[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet (padding, or a window that starts later)
        # keeps max -inf; subtracting 0 instead keeps exp2 away from NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + page[:, None] * stride_block + slot[:, None] * stride_slot
            + kv_head * stride_head + d[None, :],
            mask=k_valid[:, None], other=0.0,
        ).to(q_ptr.dtype.element_ty)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# Integers that change from step to step are not specialised on (Triton would
# compile a variant whenever one turns divisible by 16 or equal to 1).
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, tile_request_ptr, tile_start_ptr,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_block, stride_slot, stride_head,
    stride_bt, qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(tile_request_ptr + tile)
    q_local0 = tl.load(tile_start_ptr + tile)
    q_begin = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_begin
    ctx_before = tl.load(seq_lens_ptr + req) - q_len
    last_q = tl.minimum(q_local0 + BLOCK_M // GROUP, q_len) - 1
    kv_hi = ctx_before + last_q + 1  # causal: nothing past the tile's last query
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(ctx_before + q_local0 - window + 1, 0) // BLOCK_N * BLOCK_N
    acc, _m, l_i = _attend_tile(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
        req, q_begin, q_len, ctx_before, q_local0, kv_head, kv_lo, kv_hi,
        stride_q_tok, stride_q_head,
        stride_block, stride_slot, stride_head,
        stride_bt, qk_scale, window,
        GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE, HAS_WINDOW, PRECISION,
    )
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_local0 + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    d = tl.arange(0, HEAD_DIM)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + (q_begin + q_idx)[:, None] * stride_o_tok + head[:, None] * stride_o_head
        + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(q_idx < q_len)[:, None],
    )


@triton.jit(do_not_specialize=["stride_bt", "split_len"])
def _split_decode_kernel(
    part_acc_ptr, part_ml_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, seq_lens_ptr,
    stride_q_tok, stride_q_head,
    stride_block, stride_slot, stride_head,
    stride_bt, qk_scale, window, split_len,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Decode-only (one query per request): split ``split`` of request ``req``
    attends to keys [split * split_len, (split + 1) * split_len) and writes its
    unnormalised output with its row max and sum."""
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    kv_lo = split * split_len
    kv_hi = tl.minimum(kv_lo + split_len, seq_len)
    if HAS_WINDOW:
        kv_lo = tl.maximum(kv_lo, tl.maximum(seq_len - window, 0) // BLOCK_N * BLOCK_N)
    acc, m_i, l_i = _attend_tile(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
        req, req, 1, seq_len - 1, 0, kv_head, kv_lo, kv_hi,
        stride_q_tok, stride_q_head,
        stride_block, stride_slot, stride_head,
        stride_bt, qk_scale, window,
        GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE, HAS_WINDOW, PRECISION,
    )
    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows % GROUP
    valid = rows < GROUP
    base = (req * NUM_HEADS + head) * NUM_SPLITS + split
    d = tl.arange(0, HEAD_DIM)
    tl.store(part_acc_ptr + base[:, None] * HEAD_DIM + d[None, :], acc, mask=valid[:, None])
    tl.store(part_ml_ptr + base * 2, m_i, mask=valid)
    tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=valid)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, stride_o_tok, stride_o_head,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    base = (req * NUM_HEADS + head) * NUM_SPLITS + splits
    m = tl.load(part_ml_ptr + base * 2)
    s = tl.load(part_ml_ptr + base * 2 + 1)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.math.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    total = tl.sum(s * weight, 0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + base[:, None] * HEAD_DIM + d[None, :])
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + req * stride_o_tok + head * stride_o_head + d,
             out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True, slots=True)
class KernelTuning:
    """Launch parameters of the attention kernel (keys per iteration, warps,
    software-pipelining depth)."""

    block_n: int
    num_warps: int
    num_stages: int


def default_tuning(head_dim: int, decode: bool) -> KernelTuning:
    """Measured on an H200 (bf16, 32 query / 8 KV heads), median of 15 runs per layer:
    head_dim 128 (8B shape) runs 64 keys per iteration three stages deep: a prefill
    of 4 x 512 fresh tokens 100 -> 58 us, a decode of 256 x 576 178 -> 159 us (3.8
    TB/s of K/V), a mixed step (4 x 512 + 252 decodes) 234 -> 232 us, against 32
    keys two deep. head_dim 64 (1B shape) keeps 64 keys two deep, its best."""
    if head_dim <= 64:
        return KernelTuning(block_n=64, num_warps=4, num_stages=2)
    return KernelTuning(block_n=64, num_warps=4, num_stages=3)


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """Block, slot and head strides, shared by K and V (one layout for both)."""
    assert k_cache.stride() == v_cache.stride(), "K and V caches differ in layout"
    return k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)


def _precision(q: torch.Tensor) -> str:
    """float32 models get exact float32 products (TF32 would move greedy tokens
    away from the CPU reference); half types use the tensor cores as they are."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _block_m(group: int, max_query_len: int) -> int:
    """Rows per tile: 16 (the smallest tensor-core tile) for decodes, 64 for chunks."""
    rows = 16 if max_query_len <= max(1, 16 // group) else 64
    return max(rows, triton.next_power_of_2(group))


def query_tiles(query_lens: torch.Tensor, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side tile lists for ``paged_attention``: for each tile, its request and
    the index of its first query within the request. ``query_lens`` is a CPU
    int tensor, one entry per request."""
    tiles = (query_lens + block_q - 1) // block_q
    request = torch.repeat_interleave(torch.arange(len(query_lens), dtype=torch.int32), tiles)
    first = torch.cumsum(tiles, 0) - tiles
    start = (torch.arange(int(tiles.sum()), dtype=torch.int32)
             - torch.repeat_interleave(first, tiles).to(torch.int32)) * block_q
    return request, start.to(torch.int32)


def tile_rows(num_heads: int, num_kv_heads: int, max_query_len: int) -> tuple[int, int]:
    """(BLOCK_M, query tokens per tile) the kernel uses for a step whose longest
    query run is ``max_query_len``."""
    group = num_heads // num_kv_heads
    block_m = _block_m(group, max_query_len)
    return block_m, max(1, block_m // group)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor,
    tile_request: torch.Tensor, tile_start: torch.Tensor, max_query_len: int,
    scale: float, window: int | None, out: torch.Tensor | None = None,
    tuning: KernelTuning | None = None,
) -> torch.Tensor:
    """Attention of q [T, heads, D] over the paged cache (this step's K/V already
    written). ``k_cache``/``v_cache``: [blocks, PAGE, kv_heads, D];
    ``block_tables`` [R, W] int32; ``seq_lens`` [R] int32 (positions in the cache
    after this step); ``query_start`` [R + 1] int32; tiles from ``query_tiles``
    with the tile size of ``tile_rows(heads, kv_heads, max_query_len)``."""
    _, num_heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    block_m, _ = tile_rows(num_heads, kv_heads, max_query_len)
    tune = tuning or default_tuning(head_dim, decode=max_query_len == 1)
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    grid = (tile_request.shape[0], kv_heads)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start, tile_request, tile_start,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache),
        block_tables.stride(0), scale * _LOG2E, window or 0,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_N=tune.block_n, PAGE=page, HAS_WINDOW=window is not None,
        PRECISION=_precision(q), num_warps=tune.num_warps, num_stages=tune.num_stages,
    )
    return out


def split_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, num_splits: int,
    scale: float, window: int | None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode-only attention (q [B, heads, D], one query per request) with each
    request's keys split ``num_splits`` ways; ``max_seq_len`` bounds every
    ``seq_lens`` entry (a CUDA graph passes its capture-time bound)."""
    batch, num_heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    block_n = 64 if head_dim <= 64 else 32
    split_len = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    part_acc = torch.empty((batch, num_heads, num_splits, head_dim), device=q.device,
                           dtype=torch.float32)
    part_ml = torch.empty((batch, num_heads, num_splits, 2), device=q.device,
                          dtype=torch.float32)
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _split_decode_kernel[(batch, kv_heads, num_splits)](
        part_acc, part_ml, q, k_cache, v_cache, block_tables, seq_lens,
        q.stride(0), q.stride(1),
        *_cache_strides(k_cache, v_cache),
        block_tables.stride(0), scale * _LOG2E, window or 0, split_len,
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, PAGE=page,
        HAS_WINDOW=window is not None, PRECISION=_precision(q), num_warps=4, num_stages=2,
    )
    _merge_splits_kernel[(batch, num_heads)](
        out, part_acc, part_ml, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, HEAD_DIM=head_dim,
    )
    return out
