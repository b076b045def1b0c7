"""What the worker reads from a Hugging Face ``config.json``: one typed struct for
the Llama family (Llama 2/3, Qwen2, Qwen3 dense, Mistral share one decoder shape;
Qwen3 adds a per-head RMSNorm of q and k before rotary and drops the q/k/v bias).

Unsupported settings fail here, at load, with a message that names the field:
a model that silently ignores e.g. an unknown ``rope_scaling`` type would serve
wrong tokens without an error anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# architecture -> (q/k/v projections carry a bias by default, honours sliding_window)
_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, True),
    "MistralForCausalLM": (False, True),
    "Qwen3ForCausalLM": (False, True),
}
# Architectures that RMSNorm each query and key head (weights [head_dim]) before rotary.
_QK_NORM_ARCHITECTURES = frozenset({"Qwen3ForCausalLM"})
# Architectures whose window applies only with use_sliding_window, from max_window_layers on.
_QWEN_WINDOWS = frozenset({"Qwen2ForCausalLM", "Qwen3ForCausalLM"})

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The folder holds a model this worker cannot run faithfully."""


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from ``rope_parameters`` (transformers
    5) or ``rope_theta`` + ``rope_scaling`` (older checkpoints)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    # Per layer: attend to the last N positions only (None: the full context).
    sliding_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    qk_norm: bool = False  # Qwen3: q_norm / k_norm per head before rotary


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope(raw: dict[str, Any], max_positions: int) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise UnsupportedModelError(f"rope_parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise UnsupportedModelError(f"rope type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", max_positions)
        ),
    )


def _sliding_windows(raw: dict[str, Any], architecture: str, num_layers: int) -> list[int | None]:
    _, honours_window = _ARCHITECTURES[architecture]
    window = raw.get("sliding_window")
    if architecture in _QWEN_WINDOWS and not raw.get("use_sliding_window", False):
        window = None
    if not honours_window or window is None:
        return [None] * num_layers
    window = int(window)
    layer_types = raw.get("layer_types")
    if architecture in _QWEN_WINDOWS:
        if layer_types is None:
            first = int(raw.get("max_window_layers", num_layers))
            layer_types = [
                "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
            ]
    else:
        # Mistral applies its window to every layer (transformers ignores layer_types).
        layer_types = ["sliding_attention"] * num_layers
    if len(layer_types) != num_layers:
        raise UnsupportedModelError(f"layer_types has {len(layer_types)} entries, not {num_layers}")
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def parse_config(raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    """A ``ModelConfig`` from the dicts of ``config.json`` and ``generation_config.json``."""
    architectures = raw.get("architectures") or []
    supported = [a for a in architectures if a in _ARCHITECTURES]
    if not supported:
        raise UnsupportedModelError(
            f"architectures {architectures} not supported; supported: {', '.join(_ARCHITECTURES)}"
        )
    architecture = supported[0]
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
    try:
        hidden = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        num_layers = int(raw["num_hidden_layers"])
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        max_positions = int(raw.get("max_position_embeddings", 4096))
        config_values = {
            "vocab_size": int(raw["vocab_size"]),
            "intermediate_size": int(raw["intermediate_size"]),
            "head_dim": int(raw.get("head_dim") or hidden // num_heads),
            "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        }
    except KeyError as e:
        raise UnsupportedModelError(f"config.json lacks {e.args[0]!r}") from e
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(
            f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads="
            f"{num_kv_heads}"
        )
    qkv_bias_default, _ = _ARCHITECTURES[architecture]
    attention_bias = bool(raw.get("attention_bias", False))
    eos = _ids(raw.get("eos_token_id"))
    for extra in _ids((generation or {}).get("eos_token_id")):
        if extra not in eos:
            eos.append(extra)
    return ModelConfig(
        architecture=architecture,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        rope=_rope(raw, max_positions),
        qkv_bias=qkv_bias_default or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_windows=tuple(_sliding_windows(raw, architecture, num_layers)),
        eos_token_ids=tuple(eos),
        qk_norm=architecture in _QK_NORM_ARCHITECTURES,
        **config_values,
    )


def load_config(model_dir: Path) -> ModelConfig:
    """Parse ``model_dir/config.json`` (and ``generation_config.json`` when present)."""
    raw = json.loads((model_dir / "config.json").read_text())
    generation_path = model_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    return parse_config(raw, generation)
