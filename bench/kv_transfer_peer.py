"""One KV transfer engine in its own process, driven by JSON lines on stdin.

    python -m bench.kv_transfer_peer --addr ipc:///tmp/x/peer.sock --layers 16 ...

The engine runs over a real ``PagedKVCache`` filled with seeded random values
(``seeded_cache``: another process rebuilds the same contents to check bytes), as
a worker's would, without the model: the benchmark and the integration tests use
it as the other worker. Commands (one JSON object a line):

    {"op": "send", "id": ..., "peer": ADDR, "blocks": [...], "timeout_s": ...}
    {"op": "expect", "id": ..., "blocks": [...], "timeout_s": ...}
    {"op": "cancel", "id": ...}
    {"op": "digest", "blocks": [...]}          the sha256 of those blocks' bytes
    {"op": "gate", "stage": "gather"|"scatter", "after": K, "hold_s": S}
        fault injection: the chunk after K more chunks staged (or written) waits S s
        (a peer stuck mid-transfer; the tests kill it there)
    {"op": "ungate"}

Events out (one JSON object a line): ``ready`` (bound), ``expecting`` (an expect
took effect), ``ended`` (a transfer's state, bytes, seconds, error), ``digest``,
``gated``, ``error`` (a refused command).

``open_peer`` starts one (in its own process group, killed on the way out) and
gives a ``PeerProcess`` to drive it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
import torch
import zmq.asyncio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from services.worker.kv_cache import PagedKVCache
from services.worker.kv_transfer.engine import KvTransferEngine
from services.worker.kv_transfer.handle import TransferHandle
from services.worker.kv_transfer.nccl import NcclDataPath
from services.worker.kv_transfer.staging import BlockStager
from services.worker.kv_transfer.state import TransferError


def seeded_cache(layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, seed: int, device: str = "cpu") -> PagedKVCache:
    """A cache whose every block holds seeded random values (drawn on the CPU, so
    every device gets the same ones)."""
    cache = PagedKVCache(layers, num_blocks, block_size, kv_heads, head_dim,
                         torch.device(device), dtype)
    generator = torch.Generator().manual_seed(seed)
    cache._k.copy_(torch.randn(cache._k.shape, generator=generator))
    cache._v.copy_(torch.randn(cache._v.shape, generator=generator))
    return cache


def blocks_digest(stager: BlockStager, blocks: list[int]) -> str:
    staged = stager.gather(blocks)
    return hashlib.sha256(staged.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class GatedStager(BlockStager):
    """A stager that, when asked, holds one chunk for a while (fault injection)."""

    def __init__(self, cache: PagedKVCache) -> None:
        super().__init__(cache)
        self.gate: tuple[str, int, float] | None = None
        self._counts = {"gather": 0, "scatter": 0}

    def set_gate(self, stage: str, after: int, hold_s: float) -> None:
        """Hold the chunk after ``after`` more chunks of ``stage`` for ``hold_s``."""
        if stage not in self._counts:
            raise ValueError(f"gate stage must be gather or scatter, got {stage!r}")
        self._counts = dict.fromkeys(self._counts, 0)
        self.gate = (stage, after, hold_s)

    def _maybe_hold(self, stage: str) -> None:
        count = self._counts[stage]
        self._counts[stage] = count + 1
        if self.gate is not None and self.gate[0] == stage and count == self.gate[1]:
            emit({"event": "gated", "stage": stage, "chunk": count})
            threading.Event().wait(self.gate[2])

    def gather(self, blocks: list[int]) -> torch.Tensor:
        self._maybe_hold("gather")
        return super().gather(blocks)

    def scatter(self, blocks: list[int], payload: memoryview) -> None:
        self._maybe_hold("scatter")
        super().scatter(blocks, payload)


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _report(handle: TransferHandle) -> None:
    transfer = await handle.wait()
    emit({"event": "ended", "id": transfer.transfer_id, "state": transfer.state.name.lower(),
          "bytes": transfer.bytes_moved, "seconds": transfer.seconds, "error": transfer.error})


async def _command(engine: KvTransferEngine, stager: GatedStager, tg: Any,
                   command: dict[str, Any]) -> None:
    op = command["op"]
    if op == "send":
        handle = engine.send(command["id"], command["peer"], command["blocks"],
                             command.get("timeout_s", 30.0))
        tg.start_soon(_report, handle)
    elif op == "expect":
        handle = engine.expect(command["id"], command["blocks"], command.get("timeout_s", 30.0))
        emit({"event": "expecting", "id": command["id"]})
        tg.start_soon(_report, handle)
    elif op == "cancel":
        live = await engine.cancel(command["id"])
        emit({"event": "cancelled", "id": command["id"], "live": live})
    elif op == "digest":
        digest = await anyio.to_thread.run_sync(blocks_digest, stager, command["blocks"])
        emit({"event": "digest", "sha256": digest, "staging_bytes": engine.staging_bytes})
    elif op == "gate":
        stager.set_gate(command["stage"], command["after"], command["hold_s"])
    elif op == "ungate":
        stager.gate = None
    else:
        raise TransferError(f"unknown op {op!r}")


async def serve(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    cache = seeded_cache(args.layers, args.num_blocks, args.block_size, args.kv_heads,
                         args.head_dim, dtype, args.seed, args.device)
    stager = GatedStager(cache)
    nccl = NcclDataPath(stager, args.nccl_store_dir) if args.nccl_store_dir else None
    ctx = zmq.asyncio.Context()
    engine = KvTransferEngine(ctx, args.addr, f"peer/{args.seed}", stager,
                              chunk_bytes=args.chunk_bytes, window=args.window, nccl=nccl)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            emit({"event": "ready", "addr": args.addr, "block_bytes": stager.block_bytes})
            async for line in anyio.wrap_file(sys.stdin):
                try:
                    await _command(engine, stager, tg, json.loads(line))
                except (TransferError, KeyError, ValueError) as e:
                    emit({"event": "error", "error": str(e)})
            tg.cancel_scope.cancel()  # stdin closed: the driver is done with us
    finally:
        ctx.destroy(linger=0)


@dataclass
class PeerProcess:
    """A running peer, seen from the process that drives it."""

    process: Process
    addr: str
    _lines: BufferedByteReceiveStream

    async def command(self, **command: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send((json.dumps(command) + "\n").encode())

    async def event(self, kind: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """The next event of ``kind`` (earlier ones of other kinds are skipped; an
        ``error`` event raises)."""
        with anyio.fail_after(timeout_s):
            while True:
                event = json.loads(await self._lines.receive_until(b"\n", 1 << 20))
                if event["event"] == kind:
                    return event
                if event["event"] == "error":
                    raise RuntimeError(f"the peer refused a command: {event['error']}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)


@asynccontextmanager
async def open_peer(addr: str, args: Sequence[str], log_path: Path,
                    start_timeout_s: float = 120.0) -> AsyncIterator[PeerProcess]:
    """A peer bound at ``addr`` (``args``: the other flags), until the block ends."""
    with open(log_path, "wb") as log_file:
        process = await anyio.open_process(
            [sys.executable, "-m", "bench.kv_transfer_peer", "--addr", addr, *args],
            stderr=log_file, start_new_session=True)
        try:
            assert process.stdout is not None
            peer = PeerProcess(process, addr, BufferedByteReceiveStream(process.stdout))
            await peer.event("ready", start_timeout_s)
            yield peer
        finally:
            if process.returncode is None:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            with anyio.CancelScope(shield=True):
                await process.wait()
                await process.aclose()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--addr", required=True)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")  # cpu | cuda | cuda:N
    # The NCCL data path, its pair stores in this dir (empty: payload frames).
    p.add_argument("--nccl-store-dir", default="")
    p.add_argument("--chunk-bytes", type=int, default=8 << 20)
    p.add_argument("--window", type=int, default=4)
    return p


if __name__ == "__main__":
    # stdout carries the events; the engine's logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    torch.set_num_threads(1)
    anyio.run(serve, parser().parse_args(), backend="asyncio")
