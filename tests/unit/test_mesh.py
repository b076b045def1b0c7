"""The actor runtime over real ZMQ ipc sockets: hello/welcome, work delivery,
rejection of garbage with a reply, heartbeat expiry and restart detection."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest
import zmq
import zmq.asyncio

from shared.mesh import (
    DealerEndpoint,
    Identity,
    PeerJoined,
    PeerLost,
    Received,
    RouterEndpoint,
    UpstreamJoined,
)
from shared.protocol.common import Rejected
from shared.protocol.envelope import PROTOCOL_VERSION
from shared.protocol.generation import Abort

pytestmark = pytest.mark.anyio


async def next_event(endpoint, kind, timeout=5.0):
    with anyio.fail_after(timeout):
        async for event in endpoint.inbox:
            if isinstance(event, kind):
                return event
    raise AssertionError("inbox closed")


async def test_hello_work_and_welcome(ipc_dir: Path) -> None:
    ctx = zmq.asyncio.Context()
    addr = f"ipc://{ipc_dir}/r.sock"
    router = RouterEndpoint(ctx, addr, Identity("scheduler", 0), Abort, heartbeat_s=0.05)
    dealer = DealerEndpoint(ctx, addr, Identity("tokenizer", 3), Abort, heartbeat_s=0.05)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(router.run)
            await tg.start(dealer.run)
            joined = await next_event(router, PeerJoined)
            assert joined.peer.name == "tokenizer/3"
            up = await next_event(dealer, UpstreamJoined)
            assert up.welcome.service == "scheduler" and not up.restarted
            await dealer.send(Abort(request_ids=["a"]))
            got = await next_event(router, Received)
            assert got.body == Abort(request_ids=["a"]) and got.envelope.sender == "tokenizer/3"
            await router.send(got.peer, Abort(request_ids=["b"]))
            back = await next_event(dealer, Received)
            assert back.body.request_ids == ["b"]
            tg.cancel_scope.cancel()
    finally:
        router.close()
        dealer.close()
        ctx.destroy(linger=0)


async def test_garbage_is_rejected_with_reply_and_router_keeps_serving(ipc_dir: Path) -> None:
    ctx = zmq.asyncio.Context()
    addr = f"ipc://{ipc_dir}/r.sock"
    router = RouterEndpoint(ctx, addr, Identity("kvcache", 0), Abort, heartbeat_s=0.05)
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(router.run)
            raw.connect(addr)
            await raw.send_multipart([b"\x00garbage"])
            await raw.send_multipart([b"\xff\xfe", b"\x01"])
            # A well-formed envelope around a body of the wrong type.
            enc = msgspec.msgpack.encode
            envelope = enc([PROTOCOL_VERSION, 7, "x/0", "", ""])
            await raw.send_multipart([envelope, enc({"type": "Nope"})])
            replies = []
            with anyio.fail_after(5):
                while len(replies) < 3:
                    frames = await raw.recv_multipart()
                    replies.append(msgspec.msgpack.decode(frames[1], type=Rejected))
            assert router.rejections.count == 3
            assert "bad body" in replies[2].reason
            # Still serving: a proper replica can join afterwards.
            dealer = DealerEndpoint(ctx, addr, Identity("worker", 0), Abort, heartbeat_s=0.05)
            await tg.start(dealer.run)
            await next_event(router, PeerJoined)
            dealer.close()
            tg.cancel_scope.cancel()
    finally:
        raw.close(linger=0)
        router.close()
        ctx.destroy(linger=0)


async def test_silent_peer_is_reaped_and_restart_is_seen(ipc_dir: Path) -> None:
    ctx = zmq.asyncio.Context()
    addr = f"ipc://{ipc_dir}/r.sock"
    router = RouterEndpoint(ctx, addr, Identity("scheduler", 0), Abort, heartbeat_s=0.05)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(router.run)
            first = DealerEndpoint(ctx, addr, Identity("worker", 0), Abort, heartbeat_s=0.05)
            async with anyio.create_task_group() as inner:
                await inner.start(first.run)
                await next_event(router, PeerJoined)
                inner.cancel_scope.cancel()
            lost = await next_event(router, PeerLost)
            assert lost.reason == "missed heartbeats"
            second = DealerEndpoint(ctx, addr, Identity("worker", 0), Abort, heartbeat_s=0.05)
            await tg.start(second.run)
            joined = await next_event(router, PeerJoined)
            assert joined.peer.hello.incarnation == second.identity.incarnation
            second.close()
            tg.cancel_scope.cancel()
    finally:
        router.close()
        ctx.destroy(linger=0)
