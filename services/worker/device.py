"""Which device and dtype the worker computes in, and how many KV blocks fit."""

from __future__ import annotations

import torch

CPU_DEFAULT_KV_BLOCKS = 4096
# Share of the device memory still free after loading weights that goes to KV
# blocks; the rest is headroom for activations of the largest step.
MAX_AUTO_KV_BLOCKS = 262_144
CUDA_KV_MEMORY_FRACTION = 0.8

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} not supported; use auto, cpu, cuda or cuda:N")
    return device


def replica_device(name: str, replica: int, gpu_count: int) -> str:
    """The device worker replica ``replica`` computes on, on a host with ``gpu_count``
    GPUs. ``auto`` or ``cuda`` (no index) with several GPUs spreads the replicas over
    them, replica i on GPU i mod count, so data-parallel workers each get a GPU of
    their own as vLLM's data-parallel ranks do; ``cpu`` and ``cuda:N`` are kept."""
    if name not in ("auto", "cuda") or gpu_count < 2:
        return name
    return f"cuda:{replica % gpu_count}"


def gpu_count() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU, bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(
            f"dtype {name!r} not supported; use auto, float32, bfloat16 or float16"
        ) from None


# The one FP8 format the worker uses, for projections (models/quantization.py) and
# the KV cache alike: e4m3, the inference format (more mantissa than e5m2).
FP8 = torch.float8_e4m3fn
KV_CACHE_DTYPES = {"fp8": FP8, "fp8_e4m3": FP8}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """``auto``: the model's dtype; ``fp8`` (or ``fp8_e4m3``): float8 e4m3."""
    if name == "auto":
        return model_dtype
    try:
        return KV_CACHE_DTYPES[name]
    except KeyError:
        raise ValueError(f"kv_cache_dtype {name!r} not supported; use auto or fp8") from None


def default_num_kv_blocks(device: torch.device, bytes_per_block: int) -> int:
    """CPU: a fixed pool. CUDA: a fraction of what is free once the weights are in."""
    if device.type != "cuda":
        return CPU_DEFAULT_KV_BLOCKS
    free, _total = torch.cuda.mem_get_info(device)
    # A small model on a large card would get millions of blocks: more than any
    # batch can use, and every pool structure (KV manager, scheduler mirror) pays
    # for its size. Past this cap, memory is better left to the allocator.
    blocks = min(int(free * CUDA_KV_MEMORY_FRACTION) // bytes_per_block, MAX_AUTO_KV_BLOCKS)
    if blocks < 1:
        raise RuntimeError(
            f"no room for KV blocks on {device}: {free} bytes free, {bytes_per_block} per block"
        )
    return blocks


def prefer_shape_agnostic_attention(device: torch.device) -> None:
    """Keep SDPA off cuDNN's attention on CUDA.

    cuDNN builds an execution plan per input shape, and a chunked prefill's context
    grows every step, so each step paid a fresh plan: on an H200 a step of 128
    decodes plus one 32-token chunk took 69 ms instead of 11 ms (pure decode 7.3 ms
    vs 5.0 ms). The flash and memory-efficient kernels need no per-shape plan.
    The switch is process-wide, which is right for a worker process.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
