"""A real worker process hosting the KV transfer engine, driven like the scheduler
will: transfer commands on its scheduler socket, ``KvTransferDone`` back.

The test binds the scheduler's ROUTER and runs the other worker's engine itself
(over a cache of the worker's geometry). What must hold: blocks the worker computed
leave it byte-exact and come back into other blocks byte-exact; a request admitted
over received blocks (``num_computed_tokens``) samples what the original prefill
did; steps run while a transfer waits; bad commands fail cleanly.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import torch
import zmq
import zmq.asyncio

from bench.kv_transfer_peer import GatedStager
from services.worker.kv_cache import PagedKVCache
from services.worker.kv_transfer.engine import KvTransferEngine
from services.worker.kv_transfer.staging import BlockStager
from services.worker.kv_transfer.state import TransferState
from shared.embedded_model import ensure_embedded_model
from shared.mesh import Peer, Received, RouterEndpoint
from shared.protocol.envelope import pack_i32
from shared.protocol.generation import SamplingParams
from shared.protocol.step import NewRequest, StepBatch, StepPlan, StepResult
from shared.protocol.transfer import (
    KvTransferCancel,
    KvTransferDone,
    KvTransferIn,
    KvTransferOut,
)
from tests.integration.worker_procs import running_worker, scheduler_router

pytestmark = pytest.mark.anyio

NUM_KV_BLOCKS = 64
BLOCK_SIZE = 16
EVENT_TIMEOUT_S = 60.0
GREEDY = SamplingParams(temperature=0.0)
PROMPT = list(range(200, 240))  # 40 tokens: 3 blocks, the first 2 full


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def worker_dir(model_dir: Path) -> Iterator[Path]:
    def env(path: Path) -> dict[str, str]:
        return {"MESHSERVE_TRANSFER_ADDR": f"ipc://{path}/xfer-0.sock",
                "MESHSERVE_TRANSFER_CHUNK_BYTES": "4096"}  # several chunks even for 3 blocks

    with running_worker(model_dir, NUM_KV_BLOCKS, BLOCK_SIZE, "msx-", env) as path:
        yield path


def worker_cache(model_dir: Path) -> PagedKVCache:
    """A cache of the worker's geometry (float32 on the CPU), all zeros."""
    raw = json.loads((model_dir / "config.json").read_text())
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    return PagedKVCache(raw["num_hidden_layers"], NUM_KV_BLOCKS, BLOCK_SIZE,
                        raw.get("num_key_value_heads") or heads, head_dim,
                        torch.device("cpu"), torch.float32)


class Scheduler:
    def __init__(self, router: RouterEndpoint[StepResult | KvTransferDone], peer: Peer) -> None:
        self.router = router
        self.peer = peer

    async def send(self, body: object) -> None:
        assert await self.router.send(self.peer, body)

    async def next(self, kind: type) -> object:
        with anyio.fail_after(EVENT_TIMEOUT_S):
            async for event in self.router.inbox:
                if isinstance(event, Received) and isinstance(event.body, kind):
                    return event.body
        raise AssertionError("router inbox closed")

    async def done(self, transfer_id: str) -> KvTransferDone:
        report = await self.next(KvTransferDone)
        assert isinstance(report, KvTransferDone) and report.transfer_id == transfer_id, report
        return report

    async def step(self, plan: StepPlan) -> StepResult:
        await self.send(plan)
        result = await self.next(StepResult)
        assert isinstance(result, StepResult) and result.error is None, result
        return result


@asynccontextmanager
async def mesh(worker_dir: Path, model_dir: Path, stager: BlockStager | None = None,
               ) -> AsyncIterator[tuple[Scheduler, KvTransferEngine]]:
    """The scheduler's router, and the other worker's engine (over ``stager``)."""
    ctx = zmq.asyncio.Context()
    engine = KvTransferEngine(ctx, f"ipc://{worker_dir}/other.sock", "worker/9",
                              stager or BlockStager(worker_cache(model_dir)), chunk_bytes=4096)
    try:
        async with scheduler_router(worker_dir, StepResult | KvTransferDone) as (router, peer), \
                anyio.create_task_group() as tg:
            await tg.start(engine.run)
            yield Scheduler(router, peer), engine
            tg.cancel_scope.cancel()
    finally:
        ctx.destroy(linger=0)


def prefill(step_id: int, request_id: str, blocks: list[int], computed: int = 0) -> StepPlan:
    new = NewRequest(request_id, pack_i32(PROMPT), 0, GREEDY, num_computed_tokens=computed)
    return StepPlan(step_id, new=[new], batch=StepBatch.pack(
        [request_id], [len(PROMPT) - computed], [blocks]))


async def test_blocks_leave_and_return_byte_exact_and_serve_a_request(
        worker_dir: Path, model_dir: Path) -> None:
    async with mesh(worker_dir, model_dir) as (scheduler, other):
        details = scheduler.peer.hello.worker
        assert details is not None and details.transfer_addr == f"ipc://{worker_dir}/xfer-0.sock"
        first = await scheduler.step(prefill(1, "a", [3, 4, 5]))

        # Out: the worker's blocks 3-5 into the other engine's 10-12.
        arriving = other.expect("out", [10, 11, 12], EVENT_TIMEOUT_S)
        await scheduler.send(KvTransferOut.of("out", other.address, [3, 4, 5], EVENT_TIMEOUT_S))
        report = await scheduler.done("out")
        assert report.ok and report.state == "done", report
        assert (await arriving.wait()).state is TransferState.DONE
        assert report.bytes == 3 * other.stager.block_bytes
        received = other.stager.gather([10, 11, 12])
        assert received.abs().sum() > 0  # real K/V, not the zeroed cache

        # In: back into the worker's blocks 20-22, then out again to compare bytes.
        await scheduler.send(KvTransferIn.of("in", [20, 21, 22], EVENT_TIMEOUT_S))
        leaving = other.send("in", details.transfer_addr, [10, 11, 12], EVENT_TIMEOUT_S)
        assert (await scheduler.done("in")).ok
        assert (await leaving.wait()).state is TransferState.DONE
        again = other.expect("again", [30, 31, 32], EVENT_TIMEOUT_S)
        await scheduler.send(KvTransferOut.of("again", other.address, [20, 21, 22]))
        assert (await scheduler.done("again")).ok and (await again.wait()).bytes_moved
        assert torch.equal(other.stager.gather([30, 31, 32]), received)

        # A request admitted over the received prefix (2 full blocks) samples what
        # the original prefill sampled: the decode side of a hand-off.
        handed = await scheduler.step(prefill(2, "b", [20, 21, 22], computed=2 * BLOCK_SIZE))
        assert handed.token_ids == first.token_ids


async def test_steps_run_while_transfers_are_in_flight_and_cancel_reports(
        worker_dir: Path, model_dir: Path) -> None:
    # The other engine holds the second chunk it receives for 3 s: the worker's
    # outgoing transfer is mid-way while the steps run.
    receiving = GatedStager(worker_cache(model_dir))
    receiving.set_gate("scatter", 1, 3.0)
    async with mesh(worker_dir, model_dir, receiving) as (scheduler, other):
        arriving = other.expect("busy", [1, 2, 3, 4], EVENT_TIMEOUT_S)
        await scheduler.send(KvTransferOut.of("busy", other.address, [1, 2, 3, 4]))
        await scheduler.send(KvTransferIn.of("slow", [40, 41], EVENT_TIMEOUT_S))
        with anyio.fail_after(EVENT_TIMEOUT_S):
            while arriving.bytes_moved == 0:
                await arriving.changed.wait()
        for step_id in range(1, 4):
            result = await scheduler.step(prefill(step_id, f"r{step_id}", [5, 6, 7]))
            assert result.request_ids == [f"r{step_id}"]
            await scheduler.step(StepPlan(100 + step_id, finished=[f"r{step_id}"]))
        assert arriving.state is TransferState.RUNNING  # the steps did not wait for it
        assert (await scheduler.done("busy")).ok
        await scheduler.send(KvTransferCancel("slow"))
        report = await scheduler.done("slow")
        assert (report.ok, report.state, report.bytes) == (False, "cancelled", 0)


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        (KvTransferOut("bad", "ipc:///nowhere", b"\x01\x02\x03"), "int32"),
        (KvTransferIn.of("bad", [NUM_KV_BLOCKS]), "outside the pool"),
        (KvTransferIn.of("bad", []), "no blocks"),
        (KvTransferOut.of("bad", "", [1]), "no peer address"),
        (KvTransferIn.of("bad", [1], timeout_s=-1.0), "positive"),
    ],
)
async def test_a_bad_command_is_a_failed_report_and_the_worker_keeps_serving(
        worker_dir: Path, model_dir: Path, command: object, problem: str) -> None:
    async with mesh(worker_dir, model_dir) as (scheduler, _):
        await scheduler.send(command)
        report = await scheduler.done("bad")
        assert not report.ok and problem in report.error, report
        result = await scheduler.step(prefill(1, "ok", [7, 8, 9]))
        assert result.request_ids == ["ok"]
