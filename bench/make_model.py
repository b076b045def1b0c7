"""Write a random-weight Hugging Face Llama folder of a real model's shape, so that
anyone can reproduce the benchmark numbers without downloading gated weights.

    python -m bench.make_model --shape llama-3.2-1b --out /data/llama-3.2-1b-random
    python -m bench.make_model --shape llama-3.1-8b --out /data/llama-3.1-8b-random
    python -m bench.make_model --shape tiny --out /tmp/tiny-llama3   # tests

The folder holds what a real checkpoint holds: config.json with the model's
hyper-parameters (``llama3`` rope scaling included), generation_config.json, bf16
safetensors (sharded with an index when larger than --max-shard-size) and a
tokenizer covering all 128,256 ids (bench/llama3_tokenizer.py). Compute cost per
token is the real model's; the tokens it produces are noise.

Weights are drawn N(0, 0.02), Llama's ``initializer_range`` (norms are ones), so
activations stay finite in bf16 through 32 layers. Every tensor has its own
generator seeded from --seed and its position, so the bytes are the same on every
run and do not depend on the shard size. Shards are written one at a time: peak
memory is about one shard, not the model (16 GB for the 8B shape).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench import llama3_tokenizer as tok

INIT_STD = 0.02
RECIPE_VERSION = 1
CHUNK_ELEMENTS = 1 << 24  # rows drawn in float32 at a time (64 MB)


@dataclass(frozen=True, slots=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    rope_factor: float


SHAPES: dict[str, LlamaShape] = {
    # meta-llama/Llama-3.2-1B(-Instruct) and Llama-3.1-8B(-Instruct) config.json values.
    "llama-3.2-1b": LlamaShape(2048, 8192, 16, 32, 8, 64, True, 32.0),
    "llama-3.1-8b": LlamaShape(4096, 14336, 32, 32, 8, 128, False, 8.0),
    # Llama 3.2's layout (tied embeddings, full vocabulary) at test size.
    "tiny": LlamaShape(64, 256, 2, 4, 2, 16, True, 32.0),
}


def config_json(shape: LlamaShape) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.special_id(tok.BOS),
        "eos_token_id": _eos_ids(),
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": tok.MAX_POSITIONS,
        "mlp_bias": False,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "factor": shape.rope_factor,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": tok.VOCAB_SIZE,
    }


def _eos_ids() -> list[int]:
    # The Instruct models' list: a chat turn ends at <|eot_id|>.
    return [tok.special_id(t) for t in (tok.END_OF_TEXT, tok.EOM, tok.EOT)]


def tensor_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Every weight's name and shape, in Hugging Face's order."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (tok.VOCAB_SIZE, shape.hidden)
    }
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (shape.hidden,),
            p + "self_attn.q_proj.weight": (q, shape.hidden),
            p + "self_attn.k_proj.weight": (kv, shape.hidden),
            p + "self_attn.v_proj.weight": (kv, shape.hidden),
            p + "self_attn.o_proj.weight": (shape.hidden, q),
            p + "post_attention_layernorm.weight": (shape.hidden,),
            p + "mlp.gate_proj.weight": (shape.intermediate, shape.hidden),
            p + "mlp.up_proj.weight": (shape.intermediate, shape.hidden),
            p + "mlp.down_proj.weight": (shape.hidden, shape.intermediate),
        }
    shapes["model.norm.weight"] = (shape.hidden,)
    if not shape.tie_word_embeddings:
        shapes["lm_head.weight"] = (tok.VOCAB_SIZE, shape.hidden)
    return shapes


def draw(name: str, dims: tuple[int, ...], index: int, seed: int,
         device: str = "cpu") -> torch.Tensor:
    """One bf16 weight (on the CPU): ones for a norm, else N(0, INIT_STD) drawn in row
    chunks from its own generator on ``device`` (same bytes whatever else is drawn;
    a CUDA generator draws other numbers than a CPU one, of the same distribution)."""
    if name.endswith("norm.weight"):
        return torch.ones(dims, dtype=torch.bfloat16)
    generator = torch.Generator(device).manual_seed(seed * 1_000_003 + index)
    out = torch.empty(dims, dtype=torch.bfloat16)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // dims[-1])
    for start in range(0, dims[0], rows_per_chunk):
        rows = min(rows_per_chunk, dims[0] - start)
        chunk = torch.empty((rows, *dims[1:]), device=device)
        chunk.normal_(0.0, INIT_STD, generator=generator)
        out[start : start + rows] = chunk.to(torch.bfloat16).cpu()
    return out


def plan_shards(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order; a shard closes before it would pass
    ``max_bytes`` (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims in shapes.items():
        nbytes = 2 * _numel(dims)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def parse_size(text: str) -> int:
    """``2GB`` / ``500MB`` / ``100KB`` / bytes (decimal units, as transformers)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r}: write e.g. 2GB, 500MB or a number of bytes")
    unit = (match.group(2) or "B").upper()
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


def _write_weights(out: Path, shape: LlamaShape, seed: int, max_shard_bytes: int,
                   device: str = "cpu") -> None:
    shapes = tensor_shapes(shape)
    index_of = {name: i for i, name in enumerate(shapes)}
    shards = plan_shards(shapes, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for number, names in enumerate(shards, start=1):
        filename = ("model.safetensors" if len(shards) == 1
                    else f"model-{number:05d}-of-{len(shards):05d}.safetensors")
        tensors = {n: draw(n, shapes[n], index_of[n], seed, device) for n in names}
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        (out / filename).chmod(0o644)  # safetensors writes 0600; a container user must read it
        del tensors  # before the next shard is drawn: one shard in memory at a time
        weight_map |= dict.fromkeys(names, filename)
        print(f"  wrote {filename} ({len(names)} tensors)", file=sys.stderr)
    if len(shards) > 1:
        total = sum(2 * _numel(d) for d in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_model(out: Path, shape_name: str, seed: int = 0, max_shard_size: str = "2GB",
               device: str = "cpu") -> Path:
    """Write the folder; refuses a folder that already holds a model."""
    shape = SHAPES[shape_name]
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a model (config.json); pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    tok.write_tokenizer(out)
    (out / "config.json").write_text(json.dumps(config_json(shape), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.special_id(tok.BOS), "eos_token_id": _eos_ids()}, indent=2
    ))
    _write_weights(out, shape, seed, parse_size(max_shard_size), device)
    (out / "make_model.json").write_text(json.dumps(
        {"shape": shape_name, "seed": seed, "device": device, "recipe_version": RECIPE_VERSION,
         "init_std": INIT_STD, "note": "random weights: bench.make_model"}, indent=2
    ))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.make_model",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--device", default="cpu",
                        help="where weights are drawn: cuda writes an 8B folder in seconds "
                             "(other random numbers than cpu's, same distribution)")
    args = parser.parse_args(argv)
    try:
        folder = make_model(args.out, args.shape, args.seed, args.max_shard_size, args.device)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    print(folder)


if __name__ == "__main__":
    main()
