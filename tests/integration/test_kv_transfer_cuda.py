"""The KV transfer engine between two processes whose caches are on CUDA: the ZMQ
path (pinned staging on side streams) on one GPU, and the NCCL data path between
two GPUs. Both skip cleanly without the hardware; on the device:

    python -m pytest tests/integration/test_kv_transfer_cuda.py -q

Both peers are ``bench.kv_transfer_peer`` processes with seeded caches; each
reports the sha256 of its blocks' bytes, so the test compares sender and receiver
without moving the blocks a third time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch

from bench.kv_transfer_peer import PeerProcess, open_peer
from services.worker.kv_transfer.nccl import nccl_available

pytestmark = pytest.mark.anyio

SHAPE_ARGS = ["--layers", "16", "--kv-heads", "8", "--head-dim", "64", "--block-size", "16",
              "--num-blocks", "600", "--dtype", "bfloat16", "--chunk-bytes", str(4 << 20)]
START_TIMEOUT_S = 180.0
EVENT_TIMEOUT_S = 60.0


@asynccontextmanager
async def peer(ipc_dir: Path, name: str, device: str, seed: int,
               extra: list[str]) -> AsyncIterator[PeerProcess]:
    args = [*SHAPE_ARGS, "--device", device, "--seed", str(seed), *extra]
    async with open_peer(f"ipc://{ipc_dir}/{name}.sock", args, ipc_dir / f"{name}.log",
                         START_TIMEOUT_S) as process:
        yield process


async def digest(process: PeerProcess, blocks: list[int]) -> str:
    await process.command(op="digest", blocks=blocks)
    return str((await process.event("digest", EVENT_TIMEOUT_S))["sha256"])


async def move_and_compare(sender: PeerProcess, receiver: PeerProcess) -> None:
    for count in (1, 16, 256):
        src = list(range(count))
        dst = list(range(599, 599 - count, -1))
        await receiver.command(op="expect", id=f"t{count}", blocks=dst, timeout_s=EVENT_TIMEOUT_S)
        await sender.command(op="send", id=f"t{count}", peer=receiver.addr, blocks=src,
                             timeout_s=EVENT_TIMEOUT_S)
        sent = await sender.event("ended", EVENT_TIMEOUT_S)
        arrived = await receiver.event("ended", EVENT_TIMEOUT_S)
        assert sent["state"] == arrived["state"] == "done", (sent, arrived)
        assert await digest(sender, src) == await digest(receiver, dst)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_blocks_between_cuda_caches_over_pinned_staging(ipc_dir: Path) -> None:
    async with peer(ipc_dir, "a", "cuda:0", 1, []) as a, peer(ipc_dir, "b", "cuda:0", 2, []) as b:
        await move_and_compare(a, b)


@pytest.mark.skipif(not nccl_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices and NCCL")
async def test_blocks_between_two_gpus_over_nccl(ipc_dir: Path) -> None:
    nccl = ["--nccl-store-dir", str(ipc_dir / "nccl")]
    async with peer(ipc_dir, "a", "cuda:0", 1, nccl) as a, \
            peer(ipc_dir, "b", "cuda:1", 2, nccl) as b:
        await move_and_compare(a, b)
        await move_and_compare(b, a)  # the other way: a second pair group
