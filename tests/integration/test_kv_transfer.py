"""The KV transfer engine between two processes, over real ZMQ sockets.

One side is an engine in the test process, the other ``python -m
bench.kv_transfer_peer``: the same engine over a real ``PagedKVCache`` in its own
process (seeded contents, no model: a whole worker would add a model load per
process and nothing to what moves the blocks; tests/integration/
test_worker_transfer.py covers the worker hosting the engine). The peer's fault
gate holds one chunk in its stager, so "mid-transfer" is a place the test waits
for, not a moment it guesses; killing the peer there is SIGKILL of its process
group.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import pytest
import torch
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, Phase, given, settings

from bench.kv_transfer_peer import PeerProcess, blocks_digest, open_peer, seeded_cache
from services.worker.kv_cache import PagedKVCache
from services.worker.kv_transfer.engine import MAX_PEER_LINKS, KvTransferEngine
from services.worker.kv_transfer.staging import BlockStager
from services.worker.kv_transfer.state import TransferError, TransferState
from shared.curve import create_keys
from shared.frames import FrameWriter
from shared.mesh_auth import MeshAuth
from shared.protocol.common import Rejected
from shared.protocol.transfer import (
    ToTransferSender,
    TransferAbort,
    TransferBegin,
    TransferChunk,
)
from tests.wire_fuzz import FAMILIES, fuzz_batch

pytestmark = pytest.mark.anyio

LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 16, 2, 64
NUM_BLOCKS = 320
BLOCK_BYTES = 2 * LAYERS * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2  # bf16: 32 KiB
CHUNK_BYTES = 8 * BLOCK_BYTES
WINDOW = 2
PEER_SEED, LOCAL_SEED = 7, 3
START_TIMEOUT_S = 120.0  # importing torch on a loaded machine
EVENT_TIMEOUT_S = 30.0
TIMEOUT_S = 1.0  # the transfers' own deadline in the failure tests
SLACK_S = 5.0  # a loaded CI machine notices a deadline this late at worst


def peer_args() -> list[str]:
    return ["--layers", str(LAYERS), "--num-blocks", str(NUM_BLOCKS),
            "--block-size", str(BLOCK_SIZE), "--kv-heads", str(KV_HEADS),
            "--head-dim", str(HEAD_DIM), "--seed", str(PEER_SEED),
            "--chunk-bytes", str(CHUNK_BYTES), "--window", str(WINDOW)]


def new_cache(seed: int | None) -> PagedKVCache:
    if seed is not None:
        return seeded_cache(LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM,
                            torch.bfloat16, seed)
    return PagedKVCache(LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM,
                        torch.device("cpu"), torch.bfloat16)


def same_bytes(a: BlockStager, a_blocks: list[int], b: BlockStager, b_blocks: list[int]) -> bool:
    return torch.equal(a.gather(a_blocks).view(torch.uint8), b.gather(b_blocks).view(torch.uint8))


@asynccontextmanager
async def peer_process(ipc_dir: Path) -> AsyncIterator[PeerProcess]:
    async with open_peer(f"ipc://{ipc_dir}/peer.sock", peer_args(), ipc_dir / "peer.log",
                         START_TIMEOUT_S) as peer:
        yield peer


# One peer serves the tests that do not kill it (a process start is most of a
# test's time): the async fixture and the backend live as long as the module.
@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def peer() -> AsyncIterator[PeerProcess]:
    path = Path(tempfile.mkdtemp(prefix="kvp-", dir="/tmp"))
    try:
        async with peer_process(path) as process:
            yield process
            assert process.process.returncode is None, (path / "peer.log").read_text()
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class LocalEngine:
    engine: KvTransferEngine
    stager: BlockStager


@asynccontextmanager
async def local_engine(ipc_dir: Path, seed: int | None, name: str = "local",
                       ) -> AsyncIterator[LocalEngine]:
    ctx = zmq.asyncio.Context()
    stager = BlockStager(new_cache(seed))
    engine = KvTransferEngine(ctx, f"ipc://{ipc_dir}/{name}.sock", f"test/{name}", stager,
                              chunk_bytes=CHUNK_BYTES, window=WINDOW)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            yield LocalEngine(engine, stager)
            tg.cancel_scope.cancel()
    finally:
        ctx.destroy(linger=0)


async def staging_released(engine: KvTransferEngine) -> None:
    """Until ZMQ let go of every staged chunk (it does so on its I/O thread)."""
    with anyio.fail_after(EVENT_TIMEOUT_S):
        while engine.staging_bytes:
            await anyio.sleep(0.01)


async def test_blocks_arrive_byte_exact_both_ways(ipc_dir: Path, peer: PeerProcess) -> None:
    async with local_engine(ipc_dir, None) as local:
        expected = BlockStager(new_cache(PEER_SEED))
        for count in (1, 16, 256):
            src = list(range(count))
            dst = list(range(NUM_BLOCKS - 1, NUM_BLOCKS - 1 - count, -1))  # reversed placement
            handle = local.engine.expect(f"in-{count}", dst, EVENT_TIMEOUT_S)
            await peer.command(op="send", id=f"in-{count}", peer=local.engine.address,
                               blocks=src, timeout_s=EVENT_TIMEOUT_S)
            done = await handle.wait()
            assert done.state is TransferState.DONE, done.error
            assert done.bytes_moved == count * BLOCK_BYTES
            sent = await peer.event("ended")
            assert (sent["state"], sent["bytes"]) == ("done", count * BLOCK_BYTES)
            assert same_bytes(expected, src, local.stager, dst)
        # Blocks never sent stay as they were (zeros).
        untouched = local.stager.gather(list(range(NUM_BLOCKS - 257)))
        assert not untouched.any()
        # The other way: the peer receives and reports what its blocks hold.
        mine = BlockStager(new_cache(LOCAL_SEED))
        async with local_engine(ipc_dir, LOCAL_SEED, "sender") as sender:
            await peer.command(op="expect", id="out", blocks=list(range(40, 56)),
                               timeout_s=EVENT_TIMEOUT_S)
            handle = sender.engine.send("out", peer.addr, list(range(16)), EVENT_TIMEOUT_S)
            assert (await handle.wait()).state is TransferState.DONE
            assert (await peer.event("ended"))["state"] == "done"
            await peer.command(op="digest", blocks=list(range(40, 56)))
            digest = (await peer.event("digest"))["sha256"]
            assert digest == blocks_digest(mine, list(range(16)))
            await staging_released(sender.engine)
        assert local.engine.stats().completed == 3


async def test_cancel_mid_transfer_from_either_side(ipc_dir: Path, peer: PeerProcess) -> None:
    try:
        # The receiver (here) cancels while the peer is staging chunk 1.
        async with local_engine(ipc_dir, None) as local:
            handle = local.engine.expect("a", list(range(64)), EVENT_TIMEOUT_S)
            await peer.command(op="gate", stage="gather", after=1, hold_s=1.0)
            await peer.command(op="send", id="a", peer=local.engine.address,
                               blocks=list(range(64)), timeout_s=EVENT_TIMEOUT_S)
            await peer.event("gated")
            assert await local.engine.cancel("a")
            assert handle.state is TransferState.CANCELLED
            assert handle.bytes_moved < 64 * BLOCK_BYTES
            ended = await peer.event("ended")
            assert ended["state"] == "cancelled", ended["error"]
            assert "receiver cancelled" in ended["error"]
            assert not await local.engine.cancel("a")  # idempotent
        # The sender (here) cancels while the peer is writing chunk 1.
        async with local_engine(ipc_dir, LOCAL_SEED, "sender") as sender:
            await peer.command(op="expect", id="b", blocks=list(range(64)),
                               timeout_s=EVENT_TIMEOUT_S)
            await peer.command(op="gate", stage="scatter", after=1, hold_s=1.0)
            handle = sender.engine.send("b", peer.addr, list(range(64)), EVENT_TIMEOUT_S)
            await peer.event("gated")
            assert await sender.engine.cancel("b")
            assert (await handle.wait()).state is TransferState.CANCELLED
            ended = await peer.event("ended")
            assert ended["state"] == "cancelled", ended["error"]
            assert ended["bytes"] < 64 * BLOCK_BYTES
            await staging_released(sender.engine)
    finally:
        await peer.command(op="ungate")


@pytest.mark.parametrize("dies", ["sender", "receiver"])
async def test_a_peer_killed_mid_transfer_fails_the_other_side_within_its_timeout(
        ipc_dir: Path, dies: str) -> None:
    total = 128
    async with peer_process(ipc_dir) as doomed:
        local_seed = None if dies == "sender" else LOCAL_SEED
        async with local_engine(ipc_dir, local_seed) as local:
            if dies == "sender":
                handle = local.engine.expect("x", list(range(total)), TIMEOUT_S)
                await doomed.command(op="gate", stage="gather", after=2, hold_s=600)
                await doomed.command(op="send", id="x", peer=local.engine.address,
                                   blocks=list(range(total)), timeout_s=600)
            else:
                await doomed.command(op="expect", id="x", blocks=list(range(total)),
                                   timeout_s=600)
                await doomed.command(op="gate", stage="scatter", after=2, hold_s=600)
                handle = local.engine.send("x", doomed.addr, list(range(total)), TIMEOUT_S)
            await doomed.event("gated")
            doomed.kill()
            started = time.monotonic()
            with anyio.fail_after(TIMEOUT_S + SLACK_S):
                ended = await handle.wait()
            assert time.monotonic() - started <= TIMEOUT_S + SLACK_S
            assert ended.state is TransferState.FAILED and "timed out" in ended.error
            assert ended.acked < ended.num_chunks  # never reported complete
            assert local.engine.stats().in_flight == 0 and local.engine.handle("x") is None
            await staging_released(local.engine)


async def test_timeouts_with_nobody_on_the_other_side(ipc_dir: Path) -> None:
    async with local_engine(ipc_dir, LOCAL_SEED) as local:
        receiving = local.engine.expect("lonely", [1, 2], 0.5)
        sending = local.engine.send("unheard", f"ipc://{ipc_dir}/nobody.sock", [3, 4], 0.5)
        with anyio.fail_after(0.5 + SLACK_S):
            for handle in (receiving, sending):
                ended = await handle.wait()
                assert ended.state is TransferState.FAILED and "timed out" in ended.error
        await staging_released(local.engine)
        assert local.engine.stats().failed == 2


async def test_malformed_frames_are_rejected_and_the_socket_keeps_serving(ipc_dir: Path) -> None:
    async with local_engine(ipc_dir, None) as local, \
            local_engine(ipc_dir, LOCAL_SEED, "sender") as sender:
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(local.engine.address)
        decoder = msgspec.msgpack.Decoder(ToTransferSender | Rejected)
        writer = FrameWriter("fuzz/0")
        begin = TransferBegin("m", 1, 1, local.stager.layout)
        chunk = TransferChunk("m", 0, 0, 1)
        try:
            garbage: list[list[bytes]] = [
                [b"\xc1garbage"],
                [b"\x93not", b"an envelope"],
                [writer.frames(begin)[0], b"\xff\x00"],
                [*writer.frames(begin), b"a begin has no payload"],
                [*writer.frames(chunk), b"\x00" * 5, b"one frame too many"],
            ]
            for frames in garbage:
                await raw.send_multipart(frames)
                with anyio.fail_after(EVENT_TIMEOUT_S):
                    answer = decoder.decode((await raw.recv_multipart())[-1])
                assert isinstance(answer, Rejected), frames
            # Well-formed chunks of a transfer nobody expects (with a wrong-size
            # payload, and with none).
            for frames in ([*writer.frames(chunk), b"\x00" * 5], writer.frames(chunk)):
                await raw.send_multipart(frames)
                with anyio.fail_after(EVENT_TIMEOUT_S):
                    answer = decoder.decode((await raw.recv_multipart())[-1])
                assert isinstance(answer, TransferAbort) and "no such transfer" in answer.reason
            # An expected transfer that gets a wrong-size chunk fails, never completes.
            handle = local.engine.expect("m", [5], EVENT_TIMEOUT_S)
            await raw.send_multipart(writer.frames(begin))
            with anyio.fail_after(EVENT_TIMEOUT_S):
                await raw.recv_multipart()  # its credit
            await raw.send_multipart([*writer.frames(chunk), b"\x00" * (BLOCK_BYTES - 2)])
            ended = await handle.wait()
            assert ended.state is TransferState.FAILED and "carries" in ended.error
            assert local.engine.rejections.count >= len(garbage) + 3
        finally:
            raw.close(linger=0)
            ctx.destroy(linger=0)
        # The socket still serves a real transfer.
        handle = local.engine.expect("ok", [9, 10], EVENT_TIMEOUT_S)
        sent = sender.engine.send("ok", local.engine.address, [1, 2], EVENT_TIMEOUT_S)
        assert (await handle.wait()).state is TransferState.DONE
        assert (await sent.wait()).state is TransferState.DONE
        assert same_bytes(sender.stager, [1, 2], local.stager, [9, 10])


async def test_with_mesh_keys_transfers_use_curve_and_a_keyless_sender_gets_nothing_in(
        ipc_dir: Path) -> None:
    auth = MeshAuth(create_keys(ipc_dir / "keys"), "test")
    ctx, plain_ctx = zmq.asyncio.Context(), zmq.asyncio.Context()
    receiver = BlockStager(new_cache(None))
    engines = [KvTransferEngine(ctx, f"ipc://{ipc_dir}/r.sock", "r", receiver, auth=auth),
               KvTransferEngine(ctx, f"ipc://{ipc_dir}/s.sock", "s",
                                BlockStager(new_cache(LOCAL_SEED)), auth=auth),
               KvTransferEngine(plain_ctx, f"ipc://{ipc_dir}/p.sock", "p",
                                BlockStager(new_cache(PEER_SEED)))]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(auth.run_zap, ctx)
            for engine in engines:
                await tg.start(engine.run)
            into, curve_sender, plain_sender = engines
            handle = into.expect("curve", [1, 2], EVENT_TIMEOUT_S)
            sent = curve_sender.send("curve", into.address, [3, 4], EVENT_TIMEOUT_S)
            assert (await handle.wait()).state is TransferState.DONE
            assert (await sent.wait()).state is TransferState.DONE
            assert same_bytes(curve_sender.stager, [3, 4], receiver, [1, 2])
            refused = plain_sender.send("plain", into.address, [5], 1.0)
            ended = await refused.wait()
            assert ended.state is TransferState.FAILED and "timed out" in ended.error
            assert auth.failures >= 1 and into.handle("plain") is None
            tg.cancel_scope.cancel()
    finally:
        ctx.destroy(linger=0)
        plain_ctx.destroy(linger=0)


async def test_a_fuzzed_transfer_socket_keeps_its_process_serving(
        ipc_dir: Path, peer: PeerProcess) -> None:
    """1,000 fuzzed frames (tests/wire_fuzz.py, derandomized) at the peer's transfer
    socket; then a real transfer through it still completes."""
    ctx = zmq.Context()
    fuzzer = ctx.socket(zmq.DEALER)
    fuzzer.setsockopt(zmq.LINGER, 0)
    answered = 0

    @settings(max_examples=5, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(fuzz_batch(FAMILIES["transfer"], 20, 10))
    def fuzz(batch: list[list[bytes]]) -> None:
        nonlocal answered
        for frames in batch:
            with contextlib.suppress(zmq.Again):
                fuzzer.send_multipart(frames, flags=zmq.NOBLOCK)
        while fuzzer.poll(100):
            fuzzer.recv_multipart()
            answered += 1

    try:
        async with local_engine(ipc_dir, LOCAL_SEED, "sender") as sender:
            fuzzer.connect(peer.addr)
            fuzz()
            assert answered > 0  # garbage is answered, not ignored
            await peer.command(op="expect", id="after", blocks=[5, 6], timeout_s=EVENT_TIMEOUT_S)
            handle = sender.engine.send("after", peer.addr, [1, 2], EVENT_TIMEOUT_S)
            assert (await handle.wait()).state is TransferState.DONE
            assert (await peer.event("ended"))["state"] == "done"
            assert peer.process.returncode is None
    finally:
        fuzzer.close(linger=0)
        ctx.term()


async def test_connections_to_peers_are_bounded(ipc_dir: Path) -> None:
    async with local_engine(ipc_dir, LOCAL_SEED) as local:
        handles = [local.engine.send(f"t{i}", f"ipc://{ipc_dir}/gone-{i}.sock", [1], 0.3)
                   for i in range(MAX_PEER_LINKS)]
        with pytest.raises(TransferError, match="peers have transfers in flight"):
            local.engine.send("one-more", f"ipc://{ipc_dir}/gone-x.sock", [1], 0.3)
        for handle in handles:
            assert (await handle.wait()).state is TransferState.FAILED
        # Idle connections make room for new peers.
        later = local.engine.send("later", f"ipc://{ipc_dir}/gone-y.sock", [1], 0.3)
        assert (await later.wait()).state is TransferState.FAILED
        await staging_released(local.engine)
