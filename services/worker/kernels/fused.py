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

With FP8 projections (``models/quantization.py``) the kernels that feed one write
its input already quantized: the norms and ``silu_and_mul`` take ``fp8=True`` and
return ``QuantizedRows`` (FP8 values and a per-row scale, computed from the row's
model-dtype values, as ``quantization.quantize_rows`` does), and ``quantize_rows``
does the same for the attention output. Each row is one program, so its absolute
maximum needs no second kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.worker.models.quantization import FP8, FP8_MAX, MIN_AMAX, Activation, QuantizedRows

# Globals a jitted function reads must be constexpr.
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


@triton.jit
def _saturate(x):
    """x clamped to FP8's range: converting a larger value would give NaN."""
    return tl.minimum(tl.maximum(x, -_FP8_MAX), _FP8_MAX)


@triton.jit
def _row_scale(peak):
    """The FP8 scale of a row whose absolute maximum is ``peak`` (as
    ``quantization.quantize_rows`` computes it)."""
    return tl.maximum(peak, _MIN_AMAX) / _FP8_MAX


@triton.jit
def _rms_norm_kernel(
    out_ptr, scale_ptr, residual_ptr, x_ptr, weight_ptr, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
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
    y = w.to(tl.float32) * normed.to(tl.float32)
    if QUANT:
        # Quantized from the model-dtype value the unquantized path would write.
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        scale = _row_scale(tl.max(tl.abs(y), 0))
        tl.store(scale_ptr + row, scale)
        y = _saturate(y / scale)
    tl.store(out_ptr + row * hidden + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
          fp8: bool) -> Activation:
    tokens, hidden = x.shape
    out = torch.empty_like(x, dtype=FP8 if fp8 else x.dtype)
    scale = torch.empty((tokens, 1), device=x.device, dtype=torch.float32) if fp8 else out
    _rms_norm_kernel[(tokens,)](out, scale, x if residual is None else residual, x, weight,
                                hidden, eps, HAS_RESIDUAL=residual is not None, QUANT=fp8,
                                BLOCK=triton.next_power_of_2(hidden))
    return QuantizedRows(out, scale) if fp8 else out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False) -> Activation:
    """RMSNorm of x [T, hidden] (contiguous); FP8 rows with ``fp8``."""
    return _norm(x, None, weight, eps, fp8)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, fp8: bool = False
) -> Activation:
    """``residual += x`` (in place), then the RMSNorm of the new residual."""
    return _norm(x, residual, weight, eps, fp8)


@triton.jit
def _to_cache(x, cache_ptr, FP8_CACHE: tl.constexpr):
    """x as the cache stores it: an FP8 cache saturates at +-448."""
    x = x.to(tl.float32)
    if FP8_CACHE:
        x = _saturate(x)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _rotary_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
    stride_tok, stride_table, stride_slot,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, FP8_CACHE: tl.constexpr,
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
    # Rotated keys are rounded to the model dtype first, as the reference stores them.
    k_rot1 = (k1 * cos - k2 * sin).to(qkv_ptr.dtype.element_ty)
    k_rot2 = (k2 * cos + k1 * sin).to(qkv_ptr.dtype.element_ty)
    cache_off = slot.to(tl.int64) * stride_slot + kh[:, None] * HEAD_DIM + d[None, :]
    tl.store(k_cache_ptr + cache_off, _to_cache(k_rot1, k_cache_ptr, FP8_CACHE), mask=kmask)
    tl.store(k_cache_ptr + cache_off + HALF, _to_cache(k_rot2, k_cache_ptr, FP8_CACHE),
             mask=kmask)
    v_off = k_off + NUM_KV_HEADS * HEAD_DIM
    v1 = tl.load(base + v_off, mask=kmask, other=0.0)
    v2 = tl.load(base + v_off + HALF, mask=kmask, other=0.0)
    tl.store(v_cache_ptr + cache_off, _to_cache(v1, v_cache_ptr, FP8_CACHE), mask=kmask)
    tl.store(v_cache_ptr + cache_off + HALF, _to_cache(v2, v_cache_ptr, FP8_CACHE), mask=kmask)


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
        KV_BLOCK=triton.next_power_of_2(num_kv_heads), FP8_CACHE=k_cache.dtype == FP8,
    )


@triton.jit
def _silu_mul_value(gate_up_ptr, row, cols, mask, inter):
    gate = tl.load(gate_up_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0)
    # transformers: silu in the model dtype, then the product in the model dtype.
    act = (gate * tl.sigmoid(gate)).to(up.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype)


@triton.jit
def _silu_mul_kernel(out_ptr, gate_up_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    tl.store(out_ptr + row * inter + cols, _silu_mul_value(gate_up_ptr, row, cols, mask, inter),
             mask=mask)


@triton.jit
def _row_value(x_ptr, row, cols, mask, width, SILU_MUL: tl.constexpr):
    if SILU_MUL:
        value = _silu_mul_value(x_ptr, row, cols, mask, width)
    else:
        value = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0)
    return value.to(tl.float32)


@triton.jit
def _quantize_rows_kernel(out_ptr, scale_ptr, x_ptr, width, SILU_MUL: tl.constexpr,
                          BLOCK: tl.constexpr):
    """One row a program, in two passes over it: its absolute maximum, then the
    scaled values (the second pass reads the row back from L2)."""
    row = tl.program_id(0)
    peak = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        peak = tl.maximum(peak, tl.abs(_row_value(x_ptr, row, cols, mask, width, SILU_MUL)))
    scale = _row_scale(tl.max(peak, 0))
    tl.store(scale_ptr + row, scale)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        q = _saturate(_row_value(x_ptr, row, cols, mask, width, SILU_MUL) / scale)
        tl.store(out_ptr + row * width + cols, q.to(out_ptr.dtype.element_ty), mask=mask)


def _quantize(x: torch.Tensor, width: int, silu_mul: bool) -> QuantizedRows:
    tokens = x.shape[0]
    out = torch.empty((tokens, width), device=x.device, dtype=FP8)
    scale = torch.empty((tokens, 1), device=x.device, dtype=torch.float32)
    # 8 warps: at 256 and 2,048 rows of 14,336 (8B's SiLU) 12.9 -> 9.6 and 72 -> 67 us
    # against 4 on an H200; 1,024 or 4,096 columns a pass measured no better.
    _quantize_rows_kernel[(tokens,)](out, scale, x, width, SILU_MUL=silu_mul, BLOCK=2048,
                                     num_warps=8)
    return QuantizedRows(out, scale)


def quantize_rows(x: torch.Tensor) -> QuantizedRows:
    """Per-row FP8 quantization of x [T, width] (contiguous)."""
    return _quantize(x, x.shape[1], silu_mul=False)


def silu_and_mul(gate_up: torch.Tensor, fp8: bool = False) -> Activation:
    """silu(gate) * up of gate_up [T, 2 * inter]; FP8 rows with ``fp8``."""
    tokens, double = gate_up.shape
    inter = double // 2
    if fp8:
        return _quantize(gate_up, inter, silu_mul=True)
    out = torch.empty((tokens, inter), device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(tokens, triton.cdiv(inter, block))](out, gate_up, inter, BLOCK=block)
    return out
