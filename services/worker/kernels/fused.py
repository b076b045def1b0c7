"""Fused element-wise kernels for the decoder on CUDA.

Each replaces a chain of eager torch ops that reads and writes the activations
several times and costs a launch per op (rms_norm alone is six): at decode batch
sizes these small kernels, not the matmuls, were most of a step's GPU time.

- ``add_rms_norm``: residual += x, then RMSNorm of the sum (one pass). Numerics
  follow transformers: the sum is rounded to the model dtype (it is the residual
  stream), statistics in float32, the normalised value cast to the model dtype
  before the weight multiplies it.
- ``rotary_and_cache``: rotates the query heads in place and writes the rotated
  keys and the values straight into the paged cache at each token's slot, so
  the step's K/V never exist as separate tensors.
- ``silu_and_mul``: silu(gate) * up of the fused gate/up projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    out_ptr, residual_ptr, x_ptr, weight_ptr, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * hidden + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * hidden + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, 0) / hidden
    normed = (x32 * tl.math.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * hidden + cols, (w.to(tl.float32) * normed.to(tl.float32))
             .to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [T, hidden] (contiguous)."""
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](out, x, x, weight, hidden, eps,
                                    HAS_RESIDUAL=False, BLOCK=triton.next_power_of_2(hidden))
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` (in place), then the RMSNorm of the new residual."""
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](out, residual, x, weight, hidden, eps,
                                    HAS_RESIDUAL=True, BLOCK=triton.next_power_of_2(hidden))
    return out


@triton.jit
def _rotary_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
    stride_tok, stride_table, stride_slot,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
):
    tok = tl.program_id(0)
    pos = tl.load(positions_ptr + tok)
    slot = tl.load(slots_ptr + tok)
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_table + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_table + d).to(tl.float32)
    base = qkv_ptr + tok * stride_tok
    # Queries: rotated in place.
    h = tl.arange(0, HEADS_BLOCK)
    hmask = (h < NUM_HEADS)[:, None]
    q_off = h[:, None] * HEAD_DIM + d[None, :]
    q1 = tl.load(base + q_off, mask=hmask, other=0.0).to(tl.float32)
    q2 = tl.load(base + q_off + HALF, mask=hmask, other=0.0).to(tl.float32)
    tl.store(base + q_off, (q1 * cos - q2 * sin).to(qkv_ptr.dtype.element_ty), mask=hmask)
    tl.store(base + q_off + HALF, (q2 * cos + q1 * sin).to(qkv_ptr.dtype.element_ty), mask=hmask)
    # Keys: rotated into the cache; values: copied into the cache.
    kh = tl.arange(0, KV_BLOCK)
    kmask = (kh < NUM_KV_HEADS)[:, None]
    k_off = NUM_HEADS * HEAD_DIM + kh[:, None] * HEAD_DIM + d[None, :]
    k1 = tl.load(base + k_off, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(base + k_off + HALF, mask=kmask, other=0.0).to(tl.float32)
    cache_off = slot.to(tl.int64) * stride_slot + kh[:, None] * HEAD_DIM + d[None, :]
    tl.store(k_cache_ptr + cache_off, (k1 * cos - k2 * sin).to(k_cache_ptr.dtype.element_ty),
             mask=kmask)
    tl.store(k_cache_ptr + cache_off + HALF,
             (k2 * cos + k1 * sin).to(k_cache_ptr.dtype.element_ty), mask=kmask)
    v_off = k_off + NUM_KV_HEADS * HEAD_DIM
    v1 = tl.load(base + v_off, mask=kmask, other=0.0)
    v2 = tl.load(base + v_off + HALF, mask=kmask, other=0.0)
    tl.store(v_cache_ptr + cache_off, v1, mask=kmask)
    tl.store(v_cache_ptr + cache_off + HALF, v2, mask=kmask)


def rotary_and_cache(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int,
) -> None:
    """qkv [T, (heads + 2 kv_heads) * D] (contiguous); cos/sin [positions, D]
    tables ("rotate half" layout: both halves equal); caches
    [blocks, PAGE, kv_heads, D]; ``slots`` [T] flat cache slots."""
    _rotary_cache_kernel[(qkv.shape[0],)](
        qkv, cos, sin, positions, slots, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_BLOCK=triton.next_power_of_2(num_heads),
        KV_BLOCK=triton.next_power_of_2(num_kv_heads),
    )


@triton.jit
def _silu_mul_kernel(out_ptr, gate_up_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0)
    # transformers: silu in the model dtype, then the product in the model dtype.
    act = (gate * tl.sigmoid(gate)).to(up.dtype)
    tl.store(out_ptr + row * inter + cols,
             (act.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    tokens, double = gate_up.shape
    inter = double // 2
    out = torch.empty((tokens, inter), device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(tokens, triton.cdiv(inter, block))](out, gate_up, inter, BLOCK=block)
    return out
