"""The Llama-family decoder (Llama 2/3, Qwen2, Qwen3 dense, Mistral) in plain torch
over a paged KV cache.

Weights are plain tensors, not ``nn.Module``s: a step is a straight run of
functional ops over one flat token batch, with no module dispatch per call. q/k/v
and gate/up projections are fused into one matmul each (fewer, larger GEMMs).

Numerics follow transformers' implementation (RMSNorm in float32, rope tables in
float32 cast to the model dtype, ``rotate_half``), which greedy decoding must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.worker.attention import AttentionMetadata, paged_attention
from services.worker.kv_cache import PagedKVCache
from services.worker.models.config import ModelConfig, UnsupportedModelError, load_config
from services.worker.models.quantization import (
    Weight,
    check_quantization,
    linear,
    quantize_weight,
)
from services.worker.models.rope import RotaryTables, apply_rotary
from services.worker.models.weights import load_weights


@dataclass(slots=True)
class DecoderLayer:
    input_norm: torch.Tensor
    qkv: Weight  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: Weight
    o_bias: torch.Tensor | None
    post_attention_norm: torch.Tensor
    gate_up: Weight  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: Weight
    down_bias: torch.Tensor | None
    sliding_window: int | None
    # Qwen3: RMSNorm weights [head_dim] applied to each query / key head before rotary.
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    def quantize(self) -> None:
        """Replace the four projection weights by FP8 ones (``quantization.py``)."""
        for name in ("qkv", "o", "gate_up", "down"):
            weight = getattr(self, name)
            assert isinstance(weight, torch.Tensor)
            setattr(self, name, quantize_weight(weight))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: statistics in float32, scale in the input dtype."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class _WeightTaker:
    """Pops named tensors so that, at the end, leftovers reveal an unexpected layout."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self._weights = weights

    def take(self, name: str) -> torch.Tensor:
        try:
            return self._weights.pop(name)
        except KeyError:
            raise UnsupportedModelError(f"checkpoint lacks tensor {name!r}") from None

    def maybe(self, name: str, present: bool) -> torch.Tensor | None:
        return self.take(name) if present else None

    def leftovers(self) -> list[str]:
        return sorted(self._weights)


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    if len(present) != len(tensors):
        raise UnsupportedModelError("some fused projections have a bias and some do not")
    return torch.cat(present, dim=0).contiguous()


class LlamaModel:
    """``forward`` runs one step's tokens through the decoder and returns the last
    hidden states of the rows asked for; ``logits`` maps those to the vocabulary."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        max_positions: int,
        quantization: str = "",
    ) -> None:
        """``quantization``: "" keeps the weights in ``dtype``; "fp8" quantizes the
        projections as each layer is built, so the full-precision copy of only one
        layer is alive beside the quantized ones."""
        check_quantization(quantization, dtype)
        self.config = config
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        taker = _WeightTaker(weights)
        self.embed_tokens = taker.take("model.embed_tokens.weight")
        self.layers: list[DecoderLayer] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            qkv_names = [attn + "q_proj", attn + "k_proj", attn + "v_proj"]
            gate_up_names = [mlp + "gate_proj", mlp + "up_proj"]
            qkv = _cat([taker.take(n + ".weight") for n in qkv_names])
            gate_up = _cat([taker.take(n + ".weight") for n in gate_up_names])
            assert qkv is not None and gate_up is not None
            self.layers.append(
                DecoderLayer(
                    input_norm=taker.take(p + "input_layernorm.weight"),
                    qkv=qkv,
                    qkv_bias=_cat([taker.maybe(n + ".bias", config.qkv_bias) for n in qkv_names]),
                    o=taker.take(attn + "o_proj.weight"),
                    o_bias=taker.maybe(attn + "o_proj.bias", config.o_bias),
                    post_attention_norm=taker.take(p + "post_attention_layernorm.weight"),
                    gate_up=gate_up,
                    gate_up_bias=_cat(
                        [taker.maybe(n + ".bias", config.mlp_bias) for n in gate_up_names]
                    ),
                    down=taker.take(mlp + "down_proj.weight"),
                    down_bias=taker.maybe(mlp + "down_proj.bias", config.mlp_bias),
                    sliding_window=config.sliding_windows[i],
                    q_norm=taker.maybe(attn + "q_norm.weight", config.qk_norm),
                    k_norm=taker.maybe(attn + "k_norm.weight", config.qk_norm),
                )
            )
            if quantization == "fp8":
                self.layers[-1].quantize()
        self.norm = taker.take("model.norm.weight")
        if config.tie_word_embeddings:
            # Some tied checkpoints still store the head; it equals the embedding.
            taker.maybe("lm_head.weight", "lm_head.weight" in taker.leftovers())
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = taker.take("lm_head.weight")
        unexpected = taker.leftovers()
        if unexpected:
            shown = ", ".join(unexpected[:5])
            raise UnsupportedModelError(
                f"checkpoint has {len(unexpected)} tensors this model does not use: {shown}"
            )
        self.rotary = RotaryTables(config.rope, config.head_dim, max_positions, device, dtype)
        self.scale = config.head_dim**-0.5
        self._q_size = config.num_heads * config.head_dim
        self._kv_size = config.num_kv_heads * config.head_dim

    @classmethod
    def load(
        cls, model_dir: Path, device: torch.device, dtype: torch.dtype, max_positions: int = 0,
        quantization: str = "",
    ) -> LlamaModel:
        config = load_config(model_dir)
        weights = load_weights(model_dir, device, dtype)
        return cls(config, weights, device, dtype, max_positions or config.max_position_embeddings,
                   quantization)

    def new_kv_cache(self, num_blocks: int, block_size: int,
                     dtype: torch.dtype | None = None) -> PagedKVCache:
        """A cache for this model, in ``dtype`` (default: the model's)."""
        c = self.config
        return PagedKVCache(
            c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim,
            self.device, dtype or self.dtype,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
        output_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Hidden states [len(output_rows), hidden] after the final norm, for the
        flat-batch rows in ``output_rows``; every token's K/V land in the cache."""
        c = self.config
        tokens = input_ids.shape[0]
        cos, sin = self.rotary.lookup(positions)
        hidden = F.embedding(input_ids, self.embed_tokens)
        for index, layer in enumerate(self.layers):
            x = rms_norm(hidden, layer.input_norm, c.rms_norm_eps)
            qkv = linear(x, layer.qkv, layer.qkv_bias, self.dtype)
            q, k, v = qkv.split([self._q_size, self._kv_size, self._kv_size], dim=-1)
            q = q.view(tokens, c.num_heads, c.head_dim)
            k = k.view(tokens, c.num_kv_heads, c.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q = rms_norm(q, layer.q_norm, c.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, c.rms_norm_eps)
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
            v = v.view(tokens, c.num_kv_heads, c.head_dim)
            attn = paged_attention(
                q, k, v, kv_cache.k[index], kv_cache.v[index], meta,
                layer.sliding_window, self.scale,
            )
            hidden = hidden + linear(attn.reshape(tokens, self._q_size), layer.o, layer.o_bias,
                                     self.dtype)
            x = rms_norm(hidden, layer.post_attention_norm, c.rms_norm_eps)
            gate, up = linear(x, layer.gate_up, layer.gate_up_bias, self.dtype).chunk(2, dim=-1)
            hidden = hidden + linear(F.silu(gate) * up, layer.down, layer.down_bias, self.dtype)
        return rms_norm(hidden[output_rows], self.norm, c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [rows, vocab] (sampling and argmax work in float32)."""
        return F.linear(hidden, self.lm_head).float()
