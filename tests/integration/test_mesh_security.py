"""The api process alone with mesh keys and an API key, over its real sockets.

The test holds the mesh's keys and plays the scheduler (a CURVE server the api
connects to) and a tokenizer replica (a CURVE client of the api). Three raw pyzmq
DEALERs without the mesh's client key (no CURVE at all, another mesh's client key,
the wrong server key) send well-formed hellos and work to the api's socket: none of
it reaches the api (no answer, nothing rejected at the message layer, the tokenizer
slot stays the keyed replica's), and each is counted on ``/metrics``. Over HTTP, a
request without the API key is a 401 that never reaches the mesh, one with it
goes through the keyed tokenizer and back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
import zmq
import zmq.asyncio

from shared.curve import MeshKeys, create_keys
from shared.frames import FrameWriter
from shared.mesh import (
    DealerEndpoint,
    Identity,
    PeerJoined,
    Received,
    RouterEndpoint,
    UpstreamJoined,
)
from shared.mesh_auth import MeshAuth
from shared.protocol.generation import (
    Abort,
    GenerateRequest,
    SchedulerStatus,
    TextBatch,
    TextDelta,
)
from tests.e2e.mesh import free_port
from tests.integration.procs import mesh_addresses, read_log, running_service

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 0.2
WAIT_S = 60.0  # generous: a loaded 2-core machine starts the api slowly
API_KEY = "sk-mesh-test"

Connect = Callable[[zmq.Socket[bytes]], None]


def intruders(keys: MeshKeys, other: MeshKeys) -> dict[str, Connect]:
    return {
        "plaintext": lambda sock: None,
        "foreign client key": MeshKeys(server=keys.server, client=other.client).connect,
        "wrong server key": MeshKeys(server=other.server, client=keys.client).connect,
    }


async def play_scheduler(router: RouterEndpoint[Abort]) -> None:
    """Answers the api's hello with a status, as the real scheduler does."""
    async for event in router.inbox:
        if isinstance(event, PeerJoined) and event.peer.hello.service == "api":
            await router.send(event.peer, SchedulerStatus(workers=1, running=0, waiting=0))


async def play_tokenizer(dealer: DealerEndpoint[GenerateRequest | Abort], joined: anyio.Event,
                         requests: list[str]) -> None:
    """Answers every request with "fine"."""
    async for event in dealer.inbox:
        if isinstance(event, UpstreamJoined):
            joined.set()
        elif isinstance(event, Received) and isinstance(event.body, GenerateRequest):
            requests.append(event.body.request_id)
            delta = TextDelta(event.body.request_id, "fine", 0, 3, 1, "stop")
            await dealer.send(TextBatch([delta]))


async def zmq_auth_failures(http: httpx.AsyncClient) -> int:
    metrics = (await http.get("/metrics")).text.splitlines()
    line = next(m for m in metrics if m.startswith("meshserve:zmq_auth_failures_total "))
    return int(float(line.split()[1]))


async def poll(predicate: Callable[[], object]) -> None:
    # The api's counters and /health are polled by nature: with a deadline.
    with anyio.fail_after(WAIT_S):
        while not await predicate():  # type: ignore[misc]
            await anyio.sleep(0.05)


async def test_keyless_peers_get_nothing_through_and_http_needs_the_api_key(
    ipc_dir: Path,
) -> None:
    keys = create_keys(ipc_dir / "keys")
    other = create_keys(ipc_dir / "other")
    addresses = mesh_addresses(ipc_dir)
    port = free_port()
    env = {"MESHSERVE_CURVE_DIR": str(ipc_dir / "keys"), "MESHSERVE_API_KEY": API_KEY,
           "MESHSERVE_PORT": str(port), "MESHSERVE_HEARTBEAT_S": str(HEARTBEAT_S)}
    ctx = zmq.asyncio.Context()
    auth = MeshAuth(keys, "test")
    scheduler: RouterEndpoint[Abort] = RouterEndpoint(
        ctx, addresses.scheduler_addr, Identity("scheduler", 0), Abort,
        heartbeat_s=HEARTBEAT_S, auth=auth)
    tokenizer: DealerEndpoint[GenerateRequest | Abort] = DealerEndpoint(
        ctx, addresses.api_addr, Identity("tokenizer", 0), GenerateRequest | Abort,
        heartbeat_s=HEARTBEAT_S, auth=auth)
    intruder_ctx = zmq.asyncio.Context()
    joined = anyio.Event()
    requests: list[str] = []
    try:
        with running_service("api", ipc_dir, env):
            async with (
                anyio.create_task_group() as tg,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as http,
            ):
                await tg.start(auth.run_zap, ctx)
                await tg.start(scheduler.run)
                tg.start_soon(play_scheduler, scheduler)
                await tg.start(tokenizer.run)
                tg.start_soon(play_tokenizer, tokenizer, joined, requests)

                async def healthy() -> bool:
                    try:
                        return (await http.get("/health")).status_code == 200
                    except httpx.TransportError:
                        return False

                # /health is open, and healthy only once both keyed peers are in.
                await poll(healthy)
                assert joined.is_set()

                writer = FrameWriter("tokenizer/7")
                hello = Identity("tokenizer", 7).hello(ready=True, capacity=1)
                work = TextBatch([TextDelta("cmpl-x", "evil", 0, 1, 1, "stop")])
                for name, connect in intruders(keys, other).items():
                    before = await zmq_auth_failures(http)
                    raw = intruder_ctx.socket(zmq.DEALER)
                    raw.setsockopt(zmq.LINGER, 0)
                    raw.setsockopt(zmq.IDENTITY, b"tokenizer/7")
                    connect(raw)
                    try:
                        raw.connect(addresses.api_addr)
                        await raw.send_multipart(writer.frames(hello))
                        await raw.send_multipart(writer.frames(work))

                        async def counted(before: int = before) -> bool:
                            return await zmq_auth_failures(http) > before

                        await poll(counted)
                        # No Welcome, no Rejected: the api never saw a frame of it.
                        assert not await raw.poll(300), name
                    finally:
                        raw.close(linger=0)

                missing = await http.post("/v1/completions",
                                          json={"prompt": "hi"})
                assert missing.status_code == 401
                assert missing.json()["error"]["code"] == "invalid_api_key"
                good = await http.post("/v1/completions", json={"prompt": "hi"},
                                       headers={"Authorization": f"Bearer {API_KEY}"})
                assert good.status_code == 200, good.text
                assert good.json()["choices"][0]["text"] == "fine"
                assert len(requests) == 1  # the 401 never reached the mesh
                metrics = dict(line.rsplit(" ", 1) for line in
                               (await http.get("/metrics")).text.splitlines()
                               if line and not line.startswith("#"))
                assert float(metrics["meshserve:api_auth_failures_total"]) == 1
                assert float(metrics["meshserve:api_rejected_messages_total"]) == 0
                tg.cancel_scope.cancel()
        log = read_log(ipc_dir, "api")
        # Logged (once per sender per 10 s): the ZAP refusal with the peer's address,
        # the failed handshakes under the socket's own.
        assert "client key not allowed" in log
        assert f'"sender": "api/0@{addresses.api_addr}"' in log
        assert "message rejected" not in log
    finally:
        tokenizer.close()
        scheduler.close()
        intruder_ctx.destroy(linger=0)
        ctx.destroy(linger=0)
