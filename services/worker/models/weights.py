"""Reading a Hugging Face folder's ``*.safetensors`` (single file or sharded through
``model.safetensors.index.json``) into a name -> tensor map on the target device."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of ``model_dir``, in the order its index names them."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{INDEX_FILE} names missing shards: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {model_dir}; only safetensors checkpoints are supported"
        )
    return files


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint, on the CPU in its stored dtype."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield name, f.get_tensor(name)


def load_weights(
    model_dir: Path, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The checkpoint's floating-point tensors converted to ``dtype`` on ``device``,
    one tensor at a time so peak host memory stays near one shard."""
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints store the rope buffer; we recompute it
        weights[name] = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else (
            tensor.to(device)
        )
    return weights
