"""KV transfer benchmark: bytes/s and latency between two workers' engines.

    python -m bench.kv_transfer_bench                 # CPU: two engine processes
    python -m bench.kv_transfer_bench --device cuda   # GPU caches, plus host<->GPU staging
    python -m bench.kv_transfer_bench --device cuda --backend nccl   # cuda:0 -> cuda:1, NCCL

Two ``bench.kv_transfer_peer`` processes, each an engine over a cache of the 1B
Llama's block shape (bench/make_model.py ``llama-3.2-1b``: 16 layers, 8 KV heads,
head_dim 64; block 16; bf16: 512 KiB a block), move 1, 16 and 256 blocks from one
to the other over the real transfer socket (ipc), again and again; each transfer
is sent once the receiver expects it (the scheduler's order; ``--race``: at once).
Latency is the sender's: from ``send`` to the last chunk acknowledged;
bytes/s is the blocks' bytes over that. On CUDA the staging copies are timed on
their own too: ``gather`` (GPU blocks -> pinned host) and ``scatter`` (host -> GPU
blocks), the part of a transfer the GPU does.

The JSON goes to ``bench/results/<device>-1b-kv_transfer_bench-<commit>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from bench.kv_transfer_peer import open_peer, seeded_cache
from bench.make_model import SHAPES
from bench.results import gpu_name

SHAPE = SHAPES["llama-3.2-1b"]
BLOCK_SIZE = 16
DTYPE = "bfloat16"
BLOCK_BYTES = 2 * SHAPE.layers * BLOCK_SIZE * SHAPE.kv_heads * SHAPE.head_dim * 2
COUNTS = (1, 16, 256)
NUM_BLOCKS = 2 * max(COUNTS)  # the sender's blocks and room to spare


def shape_args(device: str, seed: int, chunk_bytes: int, window: int) -> list[str]:
    return ["--layers", str(SHAPE.layers), "--kv-heads", str(SHAPE.kv_heads),
            "--head-dim", str(SHAPE.head_dim), "--block-size", str(BLOCK_SIZE),
            "--dtype", DTYPE, "--num-blocks", str(NUM_BLOCKS), "--seed", str(seed),
            "--device", device, "--chunk-bytes", str(chunk_bytes), "--window", str(window)]


def summary(seconds: list[float], nbytes: int) -> dict[str, float]:
    p50 = statistics.median(seconds)
    return {"p50_ms": 1000 * p50, "mean_ms": 1000 * statistics.fmean(seconds),
            "max_ms": 1000 * max(seconds), "bytes": nbytes,
            "gb_per_s_p50": nbytes / p50 / 1e9, "runs": len(seconds)}


async def between_processes(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    peer_a = shape_args(args.device, 1, args.chunk_bytes, args.window)
    peer_b = shape_args(args.device, 2, args.chunk_bytes, args.window)
    if args.backend == "nccl":
        # NCCL wants one GPU per rank: the receiver on the next device.
        peer_b = shape_args("cuda:1", 2, args.chunk_bytes, args.window)
        for peer in (peer_a, peer_b):
            peer += ["--nccl-store-dir", str(run_dir / "nccl")]
    async with open_peer(f"ipc://{run_dir}/a.sock", peer_a, run_dir / "a.log") as sender, \
            open_peer(f"ipc://{run_dir}/b.sock", peer_b, run_dir / "b.log") as receiver:
        for count in COUNTS:
            seconds: list[float] = []
            for run in range(args.warmup + args.runs):
                transfer_id = f"{count}-{run}"
                src = list(range(count))
                dst = list(range(NUM_BLOCKS - count, NUM_BLOCKS))
                await receiver.command(op="expect", id=transfer_id, blocks=dst, timeout_s=60)
                if not args.race:
                    await receiver.event("expecting")
                await sender.command(op="send", id=transfer_id, peer=receiver.addr,
                                     blocks=src, timeout_s=60)
                sent, arrived = await sender.event("ended"), await receiver.event("ended")
                if sent["state"] != "done" or arrived["state"] != "done":
                    raise RuntimeError(f"transfer {transfer_id} failed: {sent} / {arrived}")
                if run >= args.warmup:
                    seconds.append(sent["seconds"])
            results[str(count)] = summary(seconds, count * BLOCK_BYTES)
            print(f"{count:4d} blocks ({count * BLOCK_BYTES / 2**20:7.1f} MiB): "
                  f"p50 {results[str(count)]['p50_ms']:8.2f} ms, "
                  f"{results[str(count)]['gb_per_s_p50']:6.2f} GB/s", flush=True)
    return results


def timed(call: Callable[[], object], runs: int, warmup: int) -> list[float]:
    seconds = []
    for run in range(warmup + runs):
        started = time.perf_counter()
        call()
        if run >= warmup:
            seconds.append(time.perf_counter() - started)
    return seconds


def cuda_staging(args: argparse.Namespace) -> dict[str, Any]:
    """GPU blocks to pinned host and back, through the engine's stager."""
    import torch

    from services.worker.kv_transfer.staging import BlockStager

    cache = seeded_cache(SHAPE.layers, NUM_BLOCKS, BLOCK_SIZE, SHAPE.kv_heads, SHAPE.head_dim,
                         torch.bfloat16, 1, args.device)
    stager = BlockStager(cache)
    results: dict[str, Any] = {}
    for count in COUNTS:
        blocks = list(range(count))
        staged = stager.gather(blocks)
        payload = memoryview(staged.view(-1).view(torch.uint8).numpy())
        gather = timed(lambda b=blocks: stager.gather(b), args.runs, args.warmup)
        scatter = timed(lambda b=blocks, p=payload: stager.scatter(b, p), args.runs, args.warmup)
        results[str(count)] = {"gather_gpu_to_host": summary(gather, count * BLOCK_BYTES),
                               "scatter_host_to_gpu": summary(scatter, count * BLOCK_BYTES)}
        print(f"{count:4d} blocks staging: gather p50 "
              f"{results[str(count)]['gather_gpu_to_host']['p50_ms']:.2f} ms, scatter p50 "
              f"{results[str(count)]['scatter_host_to_gpu']['p50_ms']:.2f} ms", flush=True)
    return results


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="the caches' device: cpu | cuda")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=8 << 20)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--race", action="store_true",
                        help="send without waiting for the receiver's expect to take effect "
                             "(the begin may wait, and eager chunks be sent again)")
    parser.add_argument("--backend", choices=("zmq", "nccl"), default="zmq",
                        help="nccl: the blocks' bytes GPU to GPU (needs --device cuda, 2 GPUs)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if args.backend == "nccl" and args.device != "cuda:0":
        args.device = "cuda:0"
    run_dir = Path(tempfile.mkdtemp(prefix="kvxb-", dir="/tmp"))
    try:
        transfers = anyio.run(between_processes, args, run_dir, backend="asyncio")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    result: dict[str, Any] = {
        "date_iso": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "bench.kv_transfer_bench", *sys.argv[1:]]),
        "commit": commit(), "gpu": gpu_name(), "device": args.device,
        "block": {"layers": SHAPE.layers, "kv_heads": SHAPE.kv_heads,
                  "head_dim": SHAPE.head_dim, "block_size": BLOCK_SIZE, "dtype": DTYPE,
                  "bytes": BLOCK_BYTES},
        "chunk_bytes": args.chunk_bytes, "window": args.window, "backend": args.backend,
        "race": args.race,
        "between_processes": transfers,
    }
    if args.device.startswith("cuda"):
        result["cuda_staging"] = cuda_staging(args)
    kind = "cpu" if args.device == "cpu" else (result["gpu"] or "cuda").split()[-1].lower()
    backend = "-nccl" if args.backend == "nccl" else ""
    path = Path(args.out) / f"{kind}-1b-kv_transfer_bench{backend}-{result['commit']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
