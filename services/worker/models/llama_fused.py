"""The Llama decoder's CUDA forward: the same math as ``LlamaModel.forward`` with
fused Triton kernels (``services/worker/kernels``) and the paged-attention kernel.

The residual stream is carried beside the normalised activations so each
residual add is fused into the next RMSNorm, and rotary is fused with the K/V
cache write. ``LlamaModel.forward`` stays the reference these are tested against
(and the CPU path): bf16 rounding differs only where ops are fused (rotary in
float32 once instead of per op).

Qwen3's per-head q/k RMSNorm runs here too, in place on the fused q/k/v output
just before the rotary kernel (the reference ``rms_norm`` in torch: a few small
ops per layer, captured by the CUDA graphs like the rest); it is not fused into
``rotary_and_cache``.

With FP8 projections every kernel that feeds one writes FP8 rows and their
scales (``fp8=True``); the attention output is quantized by a kernel of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.kernel_batch import KernelAttentionMetadata
from services.worker.kernels.fused import (
    add_rms_norm,
    quantize_rows,
    rms_norm,
    rotary_and_cache,
    silu_and_mul,
)
from services.worker.kv_cache import PagedKVCache
from services.worker.models.llama import DecoderLayer, LlamaModel
from services.worker.models.llama import rms_norm as reference_rms_norm
from services.worker.models.quantization import linear


def fused_forward(
    model: LlamaModel,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: KernelAttentionMetadata,
    kv_cache: PagedKVCache,
    output_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states after the final norm for ``output_rows`` (all rows if None)."""
    c = model.config
    tokens = input_ids.shape[0]
    eps = c.rms_norm_eps
    dtype = model.dtype
    fp8 = model.quantization == "fp8"
    residual = F.embedding(input_ids, model.embed_tokens)
    layers = model.layers
    x = rms_norm(residual, layers[0].input_norm, eps, fp8)
    for index, layer in enumerate(layers):
        qkv = linear(x, layer.qkv, layer.qkv_bias, dtype)
        if layer.q_norm is not None:
            _norm_qk_heads(qkv, layer, c.num_heads, c.num_kv_heads, c.head_dim, eps)
        k_cache, v_cache = kv_cache.k[index], kv_cache.v[index]
        rotary_and_cache(qkv, model.rotary.cos, model.rotary.sin, positions, meta.slot_mapping,
                         k_cache, v_cache, c.num_heads, c.num_kv_heads, c.head_dim)
        q = qkv[:, : c.num_heads * c.head_dim].view(tokens, c.num_heads, c.head_dim)
        attn = meta.attend(q, k_cache, v_cache, layer.sliding_window, model.scale)
        attn = attn.view(tokens, -1)
        out = linear(quantize_rows(attn) if fp8 else attn, layer.o, layer.o_bias, dtype)
        x = add_rms_norm(out, residual, layer.post_attention_norm, eps, fp8)
        gate_up = linear(x, layer.gate_up, layer.gate_up_bias, dtype)
        down = linear(silu_and_mul(gate_up, fp8), layer.down, layer.down_bias, dtype)
        if index + 1 < len(layers):
            x = add_rms_norm(down, residual, layers[index + 1].input_norm, eps, fp8)
    # The final norm feeds the LM head, which stays in the model dtype.
    x = add_rms_norm(down, residual, model.norm, eps)
    assert isinstance(x, torch.Tensor)
    return x if output_rows is None else x[output_rows]


def _norm_qk_heads(
    qkv: torch.Tensor, layer: DecoderLayer, heads: int, kv_heads: int, head_dim: int, eps: float
) -> None:
    """Qwen3: RMSNorm each query and key head of ``qkv`` [T, (h + 2kv) * d] in place."""
    assert layer.q_norm is not None and layer.k_norm is not None
    tokens = qkv.shape[0]
    q_size, k_size = heads * head_dim, kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, heads, head_dim)
    k = qkv[:, q_size : q_size + k_size].view(tokens, kv_heads, head_dim)
    q.copy_(reference_rms_norm(q, layer.q_norm, eps))
    k.copy_(reference_rms_norm(k, layer.k_norm, eps))
