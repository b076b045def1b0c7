"""The prefill/decode hand-off at the message level: the real scheduler process over
its sockets; the test plays a tokenizer, the KV manager (the real KvManager logic),
and two workers, ``prefill`` and ``decode``, each bookkeeping its plans like the real
one and playing its transfer engine (the K/V move between the two bookkeepers when
both commands of an id are in; each side answers one ``KvTransferDone``). What must
hold: the commands the scheduler sends, the decode worker registering the request
over the received blocks, outputs exact, and on a failed side a cancel of the other
and a recompute, with every block back at the KV manager."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import pytest
import zmq
import zmq.asyncio

from services.kvcache.manager import KvManager
from shared.mesh import DealerEndpoint, Identity, Received, RouterEndpoint
from shared.protocol.envelope import unpack_i32
from shared.protocol.kv import KvPoolClose, KvPoolOpen, KvSync
from shared.protocol.step import StepPlan
from shared.protocol.transfer import (
    KvTransferCancel,
    KvTransferDone,
    KvTransferIn,
    KvTransferOut,
)
from tests.integration.procs import mesh_addresses, running_service
from tests.integration.test_scheduler_service import (
    DETAILS,
    TokenizerInbound,
    collect,
    submit,
)
from tests.unit.test_scheduler_core import BookkeepingWorker

pytestmark = pytest.mark.anyio

WorkerInbound = StepPlan | KvTransferOut | KvTransferIn | KvTransferCancel
ROLES = ("prefill", "decode")


@dataclass
class Transfers:
    """Both workers' transfer engines, played: ``fail_receiver`` makes the decode
    side report a failure when its command arrives."""

    bookkeepers: dict[str, BookkeepingWorker]
    endpoints: dict[str, DealerEndpoint] = field(default_factory=dict)
    fail_receiver: bool = False
    pending: dict[str, dict[str, KvTransferIn | KvTransferOut]] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (role, command type)

    async def on_command(self, role: str, command: object) -> None:
        self.seen.append((role, type(command).__name__))
        match command:
            case KvTransferIn(transfer_id=tid) if self.fail_receiver:
                await self.endpoints[role].send(KvTransferDone(tid, False, error="injected",
                                                               state="failed"))
            case KvTransferIn() | KvTransferOut():
                sides = self.pending.setdefault(command.transfer_id, {})
                sides[role] = command
                if len(sides) == 2:
                    await self._move(command.transfer_id, sides)
            case KvTransferCancel(transfer_id=tid):
                if self.pending.get(tid, {}).pop(role, None) is not None:
                    await self.endpoints[role].send(KvTransferDone(
                        tid, False, error="cancelled", state="cancelled"))

    async def _move(self, tid: str, sides: dict[str, KvTransferIn | KvTransferOut]) -> None:
        del self.pending[tid]
        src, dst = self.bookkeepers["prefill"], self.bookkeepers["decode"]
        size = DETAILS.block_size
        out, inn = sides["prefill"], sides["decode"]
        for sb, db in zip(unpack_i32(out.blocks), unpack_i32(inn.blocks), strict=True):
            for off in range(size):
                key = src.slots.get(sb * size + off)
                if key is not None:
                    dst.slots[db * size + off] = key
        for role in ROLES:
            await self.endpoints[role].send(KvTransferDone(tid, True, bytes=4096, state="done"))


async def play_worker(role: str, endpoint: DealerEndpoint, transfers: Transfers,
                      plans: list[tuple[str, StepPlan]]) -> None:
    async for event in endpoint.inbox:
        if not isinstance(event, Received):
            continue
        if isinstance(event.body, StepPlan):
            plans.append((role, event.body))
            await endpoint.send(transfers.bookkeepers[role].execute(event.body))
        else:
            await transfers.on_command(role, event.body)


@dataclass
class KvPlayer:
    """The KV manager: the real logic behind the test's ROUTER; ``changed`` is set
    (and replaced) after every message it applied, for tests waiting on its state."""

    manager: KvManager = field(default_factory=KvManager)
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def serve(self, router: RouterEndpoint) -> None:
        async for event in router.inbox:
            if not isinstance(event, Received):
                continue
            match event.body:
                case KvPoolOpen() as msg:
                    await router.send(event.peer, self.manager.open_pool(msg))
                case KvSync() as msg:
                    await router.send(event.peer, self.manager.sync(msg))
                case KvPoolClose() as msg:
                    self.manager.close_pool(msg)
            self.changed.set()
            self.changed = anyio.Event()

    async def until(self, done: Callable[[KvManager], bool], timeout: float = 30.0) -> None:
        with anyio.fail_after(timeout):
            while not done(self.manager):
                await self.changed.wait()


@dataclass
class Mesh:
    tokenizer: DealerEndpoint
    transfers: Transfers
    plans: list[tuple[str, StepPlan]]
    kv: KvPlayer


@asynccontextmanager
async def scheduler_with_roles(ipc_dir: Path) -> AsyncIterator[Mesh]:
    addresses = mesh_addresses(ipc_dir)
    ctx = zmq.asyncio.Context()
    kv = RouterEndpoint(ctx, addresses.kvcache_addr, Identity("kvcache", 0),
                        KvPoolOpen | KvSync | KvPoolClose, heartbeat_s=0.1)
    tokenizer = DealerEndpoint(ctx, addresses.scheduler_addr, Identity("tokenizer", 0),
                               TokenizerInbound, heartbeat_s=0.1)
    transfers = Transfers({role: BookkeepingWorker(block_size=DETAILS.block_size)
                           for role in ROLES})
    for i, role in enumerate(ROLES):
        identity = Identity("worker", i)
        details = msgspec.structs.replace(DETAILS, role=role,
                                          transfer_addr=f"ipc://{ipc_dir}/xfer-{i}.sock")
        transfers.endpoints[role] = DealerEndpoint(
            ctx, addresses.scheduler_addr, identity, WorkerInbound, heartbeat_s=0.1,
            hello=lambda identity=identity, details=details: identity.hello(worker=details))
    plans: list[tuple[str, StepPlan]] = []
    player = KvPlayer()
    endpoints = [kv, tokenizer, *transfers.endpoints.values()]
    try:
        with running_service("scheduler", ipc_dir, {}):
            async with anyio.create_task_group() as tg:
                await tg.start(kv.run)
                tg.start_soon(player.serve, kv)
                await tg.start(tokenizer.run)
                for role, endpoint in transfers.endpoints.items():
                    await tg.start(endpoint.run)
                    tg.start_soon(play_worker, role, endpoint, transfers, plans)
                # Both workers joined (their pools are open) before any request comes,
                # else a prefill could finish while no decode worker is up.
                await player.until(lambda manager: len(manager.pools) == 2)
                yield Mesh(tokenizer, transfers, plans, player)
                tg.cancel_scope.cancel()
    finally:
        for endpoint in endpoints:
            endpoint.close()
        ctx.destroy(linger=0)


async def pools_empty(mesh: Mesh) -> None:
    """Every block back at the KV manager (the last frees ride the next sync)."""
    await mesh.kv.until(lambda manager: not any(
        manager.usage(f"worker/{i}").used_blocks for i in range(2)))


async def test_a_request_is_prefilled_on_one_worker_and_decoded_on_the_other(
        tmp_path: Path) -> None:
    async with scheduler_with_roles(tmp_path) as mesh:
        await mesh.tokenizer.send(submit("a", prompt_len=10, max_tokens=6))
        await mesh.tokenizer.send(submit("b", prompt_len=7, max_tokens=3))
        tokens, finish, failed = await collect(mesh.tokenizer, {"a", "b"}, timeout=60)
        await pools_empty(mesh)
    assert not failed and finish == {"a": "length", "b": "length"}
    assert tokens == {"a": [100 + k for k in range(6)], "b": [100 + k for k in range(3)]}
    seen = mesh.transfers.seen
    assert seen.count(("decode", "KvTransferIn")) == seen.count(("prefill", "KvTransferOut")) == 2
    # The decode worker registered each request over the received blocks: every
    # token but its first output computed already.
    news = [new for role, plan in mesh.plans if role == "decode" for new in plan.new]
    assert sorted(n.request_id for n in news) == ["a", "b"]
    for new in news:
        assert new.num_output_tokens == 1
        assert new.num_computed_tokens == len(unpack_i32(new.token_ids)) - 1
    # The prefill worker computed the prompts and dropped each request once handed off.
    prefill_batches = [plan.batch for role, plan in mesh.plans if role == "prefill"]
    # (b's prompt is a's first 7 tokens: its first block was a prefix hit.)
    assert sum(sum(unpack_i32(b.num_tokens)) for b in prefill_batches) == 10 + 7 - 4
    dropped = [rid for role, plan in mesh.plans if role == "prefill" for rid in plan.finished]
    assert sorted(dropped) == ["a", "b"]


async def test_a_failed_receiver_cancels_the_sender_and_the_request_is_recomputed(
        tmp_path: Path) -> None:
    async with scheduler_with_roles(tmp_path) as mesh:
        mesh.transfers.fail_receiver = True
        await mesh.tokenizer.send(submit("a", prompt_len=10, max_tokens=5))
        tokens, _, failed = await collect(mesh.tokenizer, {"a"}, timeout=60)
        await pools_empty(mesh)
    assert not failed and tokens == {"a": [100 + k for k in range(5)]}
    seen = mesh.transfers.seen
    assert ("prefill", "KvTransferCancel") in seen
    # Recomputed (prompt and first output) on the prefill worker, which decodes it.
    assert not [plan for role, plan in mesh.plans if role == "decode" and plan.new]
    news = [new for role, plan in mesh.plans if role == "prefill" for new in plan.new]
    assert [n.num_output_tokens for n in news] == [0, 1]
