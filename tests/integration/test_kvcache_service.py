"""The KV manager alone over its real socket; the test plays the scheduler."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest
import zmq
import zmq.asyncio

from shared.mesh import DealerEndpoint, Identity, Received, UpstreamJoined
from shared.protocol.common import Rejected
from shared.protocol.envelope import unpack_i32
from shared.protocol.kv import KvLease, KvPoolOpen, KvStats, KvStatsRequest, KvSync
from shared.protocol.tables import RequestBlocks
from tests.integration.procs import mesh_addresses, read_log, running_service

pytestmark = pytest.mark.anyio

KvReplies = KvLease | KvStats


async def expect(endpoint: DealerEndpoint, kind: type, timeout: float = 20.0):
    with anyio.fail_after(timeout):
        async for event in endpoint.inbox:
            if isinstance(event, Received) and isinstance(event.body, kind):
                return event.body
            if isinstance(event, kind):
                return event
    raise AssertionError("inbox closed")


async def test_lease_commit_free_and_garbage(ipc_dir: Path) -> None:
    addr = mesh_addresses(ipc_dir).kvcache_addr
    ctx = zmq.asyncio.Context()
    scheduler = DealerEndpoint(ctx, addr, Identity("scheduler", 0), KvReplies, heartbeat_s=0.1)
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        with running_service("kvcache", ipc_dir):
            async with anyio.create_task_group() as tg:
                await tg.start(scheduler.run)
                await expect(scheduler, UpstreamJoined)
                await scheduler.send(KvPoolOpen("worker/0", num_blocks=8, block_size=16,
                                                lease_target=4))
                lease = await expect(scheduler, KvLease)
                leased = list(unpack_i32(lease.block_ids))
                assert len(leased) == 4 and lease.usage.leased_blocks == 4

                # Commit two blocks to a request: the lease is topped up to 4 again.
                await scheduler.send(KvSync("worker/0", 1, holds=RequestBlocks.pack(
                    {"a": leased[:2]}), lease_target=4))
                lease = await expect(scheduler, KvLease)
                assert lease.seq == 1 and lease.usage.used_blocks == 2
                assert len(unpack_i32(lease.block_ids)) == 2

                # Holding a free block that was never leased (and caches nothing) is
                # refused; state unchanged. (Holding a held block is sharing: legal.)
                granted = set(leased) | set(unpack_i32(lease.block_ids))
                never_leased = min(set(range(8)) - granted)
                await scheduler.send(KvSync("worker/0", 2, holds=RequestBlocks.pack(
                    {"b": [never_leased]}), lease_target=4))
                rejected = await expect(scheduler, Rejected)
                assert "not leased" in rejected.reason

                # Garbage from a raw socket: rejected, the service keeps serving.
                raw.connect(addr)
                await raw.send_multipart([b"\x93garbage"])
                await raw.send_multipart([b"\x01", b"\x02", b"\x03"])
                with anyio.fail_after(10):
                    frames = await raw.recv_multipart()
                assert b"Rejected" in frames[1]

                await scheduler.send(KvSync("worker/0", 3, freed=["a"], lease_target=4))
                lease = await expect(scheduler, KvLease)
                assert lease.usage.used_blocks == 0 and lease.usage.free_blocks == 4
                await scheduler.send(KvStatsRequest())
                stats = await expect(scheduler, KvStats)
                assert [p.pool_id for p in stats.pools] == ["worker/0"]
                tg.cancel_scope.cancel()
        assert "message rejected" in read_log(ipc_dir, "kvcache")
    finally:
        raw.close(linger=0)
        scheduler.close()
        ctx.destroy(linger=0)


async def test_prefix_commit_share_dump_and_cli(ipc_dir: Path) -> None:
    """Blocks held by two requests (a prefix hit), hashes committed, then
    ``meshserve kv dump`` / ``kv stats`` code paths against the live service."""
    from services.supervisor.kv_cli import _ask
    from shared.protocol.kv import KvDump, KvDumpRequest
    from shared.protocol.tables import BlockHashes

    addr = mesh_addresses(ipc_dir).kvcache_addr
    ctx = zmq.asyncio.Context()
    scheduler = DealerEndpoint(ctx, addr, Identity("scheduler", 0), KvReplies | KvDump,
                               heartbeat_s=0.1)
    try:
        with running_service("kvcache", ipc_dir):
            async with anyio.create_task_group() as tg:
                await tg.start(scheduler.run)
                await expect(scheduler, UpstreamJoined)
                await scheduler.send(KvPoolOpen("worker/0", num_blocks=8, block_size=16,
                                                lease_target=4))
                leased = list(unpack_i32((await expect(scheduler, KvLease)).block_ids))
                # "a" allocates two blocks and fills them; "b" shares the first.
                await scheduler.send(KvSync(
                    "worker/0", 1, lease_target=4,
                    holds=RequestBlocks.pack({"a": leased[:2], "b": [leased[0]]}),
                    commits=BlockHashes.pack({leased[0]: 11, leased[1]: 22})))
                lease = await expect(scheduler, KvLease)
                assert lease.usage.used_blocks == 2
                dump = await _ask(addr, KvDumpRequest("a"), KvDump)
                assert isinstance(dump, KvDump) and dump.pool_id == "worker/0"
                assert [(r.block_id, r.ref_count, r.block_hash, r.tier) for r in dump.blocks] == [
                    (leased[0], 2, 11, "device"), (leased[1], 1, 22, "device")]
                # Both end: the blocks stay cached (free, hash kept) until leased.
                await scheduler.send(KvSync("worker/0", 2, freed=["a", "b"], lease_target=4))
                lease = await expect(scheduler, KvLease)
                assert lease.usage.used_blocks == 0 and lease.usage.cached_blocks == 2
                stats = await _ask(addr, KvStatsRequest(), KvStats)
                assert isinstance(stats, KvStats) and stats.pools[0].cached_blocks == 2
                tg.cancel_scope.cancel()
    finally:
        scheduler.close()
        ctx.destroy(linger=0)


async def _serve(endpoint: DealerEndpoint, *,
                 task_status: anyio.abc.TaskStatus[anyio.CancelScope]) -> None:
    """Run an endpoint under its own cancel scope, so a test can kill just that peer."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(endpoint.run)
            task_status.started(scope)


async def test_a_restarted_scheduler_leaks_nothing(ipc_dir: Path) -> None:
    """The scheduler dies holding blocks in two pools; its new incarnation says
    hello (same identity) and re-opens one pool: the dead one's leases and holds
    are gone from both, and ``meshserve kv stats`` shows no used block."""
    from services.supervisor.kv_cli import _ask

    addr = mesh_addresses(ipc_dir).kvcache_addr
    ctx = zmq.asyncio.Context()
    old = DealerEndpoint(ctx, addr, Identity("scheduler", 0), KvReplies, heartbeat_s=0.1)
    new = DealerEndpoint(ctx, addr, Identity("scheduler", 0), KvReplies, heartbeat_s=0.1)
    try:
        with running_service("kvcache", ipc_dir):
            async with anyio.create_task_group() as tg:
                old_scope = await tg.start(_serve, old)
                await expect(old, UpstreamJoined)
                for worker in ("worker/0", "worker/1"):
                    await old.send(KvPoolOpen(worker, num_blocks=8, block_size=16,
                                              lease_target=4, owner=old.identity.incarnation))
                    leased = list(unpack_i32((await expect(old, KvLease)).block_ids))
                    await old.send(KvSync(worker, 1, lease_target=4, holds=RequestBlocks.pack(
                        {"a": leased[:3]})))
                    assert (await expect(old, KvLease)).usage.used_blocks == 3
                # The scheduler is killed: its socket goes without a word.
                old_scope.cancel()
                stats = await _ask(addr, KvStatsRequest(), KvStats)
                assert isinstance(stats, KvStats)
                assert [p.used_blocks for p in stats.pools] == [3, 3]  # still the old one's

                await tg.start(new.run)
                await expect(new, UpstreamJoined)
                # Its hello alone closes the dead incarnation's pools: worker/1 died
                # while no scheduler ran, and nobody will ever re-open or close it.
                with anyio.fail_after(20):
                    while True:
                        stats = await _ask(addr, KvStatsRequest(), KvStats)
                        assert isinstance(stats, KvStats)
                        if not stats.pools:
                            break
                        await anyio.sleep(0.1)  # polled: the close has no event here
                await new.send(KvPoolOpen("worker/0", num_blocks=8, block_size=16,
                                          lease_target=4, owner=new.identity.incarnation))
                lease = await expect(new, KvLease)
                assert (lease.usage.used_blocks, lease.usage.leased_blocks,
                        lease.usage.requests) == (0, 4, 0)
                tg.cancel_scope.cancel()
        log = read_log(ipc_dir, "kvcache")
        assert log.count("closed the pool of a dead scheduler incarnation") == 2
    finally:
        old.close()
        new.close()
        ctx.destroy(linger=0)
