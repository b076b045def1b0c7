"""The scheduler alone over its real sockets. The test plays a tokenizer, a worker
(bookkeeping the plans like the real one and sampling 100 + k), the api, and the KV
manager (the real KvManager logic behind a test-owned ROUTER)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import zmq
import zmq.asyncio

from services.kvcache.manager import KvManager
from shared.mesh import DealerEndpoint, Identity, Received, RouterEndpoint
from shared.protocol.common import Rejected, WorkerDetails
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import (
    Abort,
    DetokenizeSpec,
    Reassign,
    RequestFailed,
    SamplingParams,
    SchedulerStatus,
    SetRouting,
    Submit,
    TokenBatch,
)
from shared.protocol.kv import KvPoolClose, KvPoolOpen, KvStatsRequest, KvSync
from shared.protocol.step import StepPlan
from tests.integration.procs import mesh_addresses, read_log, running_service
from tests.unit.test_scheduler_core import EOS, BookkeepingWorker

pytestmark = pytest.mark.anyio

DETAILS = WorkerDetails(model="m", num_kv_blocks=256, block_size=4, max_model_len=512,
                        vocab_size=1000, eos_token_ids=[EOS], device="cpu")
TokenizerInbound = TokenBatch | Reassign | RequestFailed


@dataclass
class Peers:
    tokenizer: DealerEndpoint
    worker: DealerEndpoint
    bookkeeper: BookkeepingWorker
    plans: list[StepPlan]


async def play_kvcache(router: RouterEndpoint) -> None:
    manager = KvManager()
    async for event in router.inbox:
        if not isinstance(event, Received):
            continue
        match event.body:
            case KvPoolOpen() as msg:
                await router.send(event.peer, manager.open_pool(msg))
            case KvSync() as msg:
                await router.send(event.peer, manager.sync(msg))
            case KvPoolClose() as msg:
                manager.close_pool(msg)


async def play_worker(endpoint: DealerEndpoint, bookkeeper: BookkeepingWorker,
                      plans: list[StepPlan]) -> None:
    async for event in endpoint.inbox:
        if isinstance(event, Received) and isinstance(event.body, StepPlan):
            plans.append(event.body)
            await endpoint.send(bookkeeper.execute(event.body))


@asynccontextmanager
async def scheduler_with_peers(ipc_dir: Path, *, worker: bool = True,
                               eos_at: dict[str, int] | None = None,
                               **env: str) -> AsyncIterator[Peers]:
    addresses = mesh_addresses(ipc_dir)
    ctx = zmq.asyncio.Context()
    kv = RouterEndpoint(ctx, addresses.kvcache_addr, Identity("kvcache", 0), KvPoolOpen | KvSync
                        | KvPoolClose, heartbeat_s=0.1)
    tokenizer = DealerEndpoint(ctx, addresses.scheduler_addr, Identity("tokenizer", 0),
                               TokenizerInbound, heartbeat_s=0.1)
    bookkeeper = BookkeepingWorker(block_size=DETAILS.block_size, eos_at=eos_at or {})
    worker_identity = Identity("worker", 0)
    worker_ep = DealerEndpoint(ctx, addresses.scheduler_addr, worker_identity, StepPlan,
                               heartbeat_s=0.1,
                               hello=lambda: worker_identity.hello(worker=DETAILS))
    plans: list[StepPlan] = []
    extra = {f"MESHSERVE_{k.upper()}": v for k, v in env.items()}
    try:
        with running_service("scheduler", ipc_dir, extra):
            # The peers' tasks live in their own group, cancelled before their sockets
            # close: a send racing a close would fail on a dead socket.
            async with anyio.create_task_group() as peers_tg:
                await peers_tg.start(kv.run)
                peers_tg.start_soon(play_kvcache, kv)
                await peers_tg.start(tokenizer.run)
                if worker:
                    await peers_tg.start(worker_ep.run)
                    peers_tg.start_soon(play_worker, worker_ep, bookkeeper, plans)
                yield Peers(tokenizer, worker_ep, bookkeeper, plans)
                peers_tg.cancel_scope.cancel()
    finally:
        for endpoint in (kv, tokenizer, worker_ep):
            endpoint.close()
        ctx.destroy(linger=0)


def submit(rid: str, prompt_len: int = 6, max_tokens: int = 4, priority: int = 0) -> Submit:
    return Submit(rid, pack_i32(range(10, 10 + prompt_len)),
                  SamplingParams(max_tokens=max_tokens, temperature=0.0), DetokenizeSpec(),
                  priority=priority)


async def collect(tokenizer: DealerEndpoint, want: set[str], timeout: float = 20.0
                  ) -> tuple[dict[str, list[int]], dict[str, str], list[RequestFailed]]:
    tokens: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    failed: list[RequestFailed] = []
    with anyio.fail_after(timeout):
        async for event in tokenizer.inbox:
            if not isinstance(event, Received):
                continue
            match event.body:
                case TokenBatch(outputs=outputs):
                    for out in outputs:
                        seen = tokens.setdefault(out.request_id, [])
                        assert out.num_prior == len(seen)
                        seen.extend(unpack_i32(out.token_ids))
                        if out.finish_reason:
                            finish[out.request_id] = out.finish_reason
                case RequestFailed() as failure:
                    failed.append(failure)
                    finish[failure.request_id] = "failed"
            if want <= set(finish):
                return tokens, finish, failed
    raise AssertionError("inbox closed")


async def test_requests_flow_through_steps_and_finish(ipc_dir: Path) -> None:
    async with scheduler_with_peers(ipc_dir, eos_at={"eos": 1}) as peers:
        for rid, prompt, max_tokens in [("a", 5, 4), ("b", 40, 3), ("eos", 3, 50)]:
            await peers.tokenizer.send(submit(rid, prompt, max_tokens))
        tokens, finish, _ = await collect(peers.tokenizer, {"a", "b", "eos"})
        assert tokens == {"a": [100, 101, 102, 103], "b": [100, 101, 102],
                          "eos": [100, EOS]}
        assert finish == {"a": "length", "b": "length", "eos": "stop"}
        # Prompts go to the worker once; later steps carry only deltas.
        news = [n.request_id for p in peers.plans for n in p.new]
        assert sorted(news) == ["a", "b", "eos"]


async def test_queue_overflow_is_busy_and_abort_reaches_queued_and_running(
        ipc_dir: Path) -> None:
    async with scheduler_with_peers(ipc_dir, worker=False, max_waiting="2") as peers:
        for rid in ("q1", "q2", "q3"):
            await peers.tokenizer.send(submit(rid))
        _, finish, failed = await collect(peers.tokenizer, {"q3"})
        assert [(f.request_id, f.status, f.code) for f in failed] == [
            ("q3", 429, "server_busy")]
        await peers.tokenizer.send(Abort(["q1", "q2", "q1"]))
        _, finish, _ = await collect(peers.tokenizer, {"q1", "q2"})
        assert finish == {"q1": "abort", "q2": "abort"}


async def test_running_request_abort_and_priority(ipc_dir: Path) -> None:
    async with scheduler_with_peers(ipc_dir, max_num_seqs="1") as peers:
        await peers.tokenizer.send(submit("long", max_tokens=10_000 // 20))
        # Wait until it runs, then queue a low and a high priority request.
        with anyio.fail_after(20):
            while not peers.plans:
                await anyio.sleep(0.01)
        await peers.tokenizer.send(submit("low", priority=9, max_tokens=1))
        await peers.tokenizer.send(submit("high", priority=0, max_tokens=1))
        await peers.tokenizer.send(Abort(["long"]))
        _, finish, _ = await collect(peers.tokenizer, {"long", "low", "high"})
        assert finish == {"long": "abort", "low": "length", "high": "length"}
        order = [n.request_id for p in peers.plans for n in p.new]
        assert order == ["long", "high", "low"]
        assert any("long" in p.finished for p in peers.plans)


async def test_garbage_and_wrong_messages_are_rejected(ipc_dir: Path) -> None:
    addr = mesh_addresses(ipc_dir).scheduler_addr
    async with anyio.create_task_group() as tg, scheduler_with_peers(ipc_dir) as peers:
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        try:
            raw.connect(addr)
            await raw.send_multipart([b"\xc1\xc1"])
            with anyio.fail_after(10):
                frames = await raw.recv_multipart()
            assert b"Rejected" in frames[1]
        finally:
            raw.close(linger=0)
            ctx.destroy(linger=0)
        # A worker may not submit requests; a tokenizer may not send step results.
        await peers.worker.send(submit("nope"))
        await peers.tokenizer.send(Rejected(reason="confused"))
        await peers.tokenizer.send(submit("ok", max_tokens=2))
        tokens, _, _ = await collect(peers.tokenizer, {"ok"})
        assert tokens["ok"] == [100, 101]
        tg.cancel_scope.cancel()
    log = read_log(ipc_dir, "scheduler")
    assert "Submit is only accepted from tokenizers" in log
    assert log.count("message rejected") >= 2


async def test_status_reaches_the_api(ipc_dir: Path) -> None:
    addr = mesh_addresses(ipc_dir).scheduler_addr
    async with anyio.create_task_group() as tg, scheduler_with_peers(ipc_dir):
        ctx = zmq.asyncio.Context()
        api = DealerEndpoint(ctx, addr, Identity("api", 0), SchedulerStatus, heartbeat_s=0.1)
        try:
            await tg.start(api.run)
            with anyio.fail_after(20):
                async for event in api.inbox:
                    if isinstance(event, Received) and event.body.workers == 1:
                        break
        finally:
            api.close()
            ctx.destroy(linger=0)
        tg.cancel_scope.cancel()


async def test_routing_changes_at_run_time_and_a_bad_mode_is_rejected(ipc_dir: Path) -> None:
    # What `meshserve kv set routing MODE` sends: answered by the status (with the
    # per-worker share) or, for an unknown mode, Rejected; the scheduler keeps serving.
    addr = mesh_addresses(ipc_dir).scheduler_addr
    async with anyio.create_task_group() as tg, scheduler_with_peers(
            ipc_dir, routing="round-robin") as peers:
        ctx = zmq.asyncio.Context()
        cli = DealerEndpoint(ctx, addr, Identity("cli", 0), SchedulerStatus | Rejected,
                             heartbeat_s=0.1)
        answers: list[object] = []
        try:
            await tg.start(cli.run)
            with anyio.fail_after(20):
                # The worker's hello may reach the scheduler after the cli's first
                # question: ask again until the status knows it (a handshake, no sleep).
                await cli.send(KvStatsRequest())
                async for event in cli.inbox:
                    if isinstance(event, Received) and isinstance(event.body, SchedulerStatus):
                        if event.body.per_worker:
                            answers.append(event.body)
                            break
                        await cli.send(KvStatsRequest())
                await cli.send(SetRouting("random"))
                await cli.send(SetRouting("least-loaded"))
                async for event in cli.inbox:
                    if isinstance(event, Received):
                        answers.append(event.body)
                        if len(answers) == 3:
                            break
        finally:
            cli.close()
            ctx.destroy(linger=0)
        await peers.tokenizer.send(submit("after", max_tokens=2))
        tokens, _, _ = await collect(peers.tokenizer, {"after"})
        assert tokens["after"] == [100, 101]
        tg.cancel_scope.cancel()
    before, refused, after = answers
    assert isinstance(before, SchedulerStatus) and before.routing == "round-robin"
    assert [w.worker for w in before.per_worker] == ["worker/0"]
    assert isinstance(refused, Rejected) and "routing must be one of" in refused.reason
    assert isinstance(after, SchedulerStatus) and after.routing == "least-loaded"
