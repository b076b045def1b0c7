"""CURVE on the mesh's sockets: key files and their modes, the ZAP policy, and real
ipc sockets where a peer without the mesh's client key (no CURVE at all, a key of
another mesh, or the wrong server key) gets nothing through and is counted, while
a keyed replica joins and works."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import zmq
import zmq.asyncio
import zmq.utils.z85

from shared.curve import CurveKeyError, MeshKeys, create_keys, ensure_keys, load_keys
from shared.mesh import (
    MAX_SENDERS_TRACKED,
    DealerEndpoint,
    Identity,
    PeerJoined,
    Received,
    RejectionLog,
    RouterEndpoint,
)
from shared.mesh_auth import MeshAuth
from shared.protocol.generation import Abort
from shared.zap import ZapPolicy, ZapRequest, parse_request

DEADLINE_S = 20.0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_private_and_load_back(tmp_path: Path) -> None:
    key_dir = tmp_path / "run" / "keys"
    keys = create_keys(key_dir)
    assert mode(key_dir) == 0o700
    files = sorted(p.name for p in key_dir.iterdir())
    assert files == ["client.key", "client.key_secret", "server.key", "server.key_secret"]
    assert all(mode(key_dir / name) == 0o600 for name in files)
    assert load_keys(key_dir) == keys
    assert keys.server != keys.client and len(keys.server.secret) == 40


def test_existing_keys_are_kept_unless_forced(tmp_path: Path) -> None:
    first = create_keys(tmp_path / "k")
    with pytest.raises(CurveKeyError, match="--force"):
        create_keys(tmp_path / "k")
    assert ensure_keys(tmp_path / "k") == first
    assert create_keys(tmp_path / "k", overwrite=True) != first


def test_a_dir_made_open_is_made_private(tmp_path: Path) -> None:
    key_dir = tmp_path / "k"
    key_dir.mkdir(mode=0o755)
    create_keys(key_dir)
    assert mode(key_dir) == 0o700


def test_missing_keys_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CurveKeyError, match=r"meshserve keys --dir"):
        load_keys(tmp_path / "nothing")
    create_keys(tmp_path / "k")
    (tmp_path / "k" / "server.key_secret").write_text("public-key = \"abc\"\n")
    with pytest.raises(CurveKeyError, match="no secret key"):
        load_keys(tmp_path / "k")


def zap_request(mechanism: bytes, *credentials: bytes) -> ZapRequest:
    request = parse_request([b"1.0", b"7", b"meshserve", b"10.0.0.9", b"", mechanism,
                             *credentials])
    assert isinstance(request, ZapRequest)
    return request


def test_zap_policy_admits_only_the_mesh_client_key(tmp_path: Path) -> None:
    keys = create_keys(tmp_path / "k")
    policy = ZapPolicy(keys.allowed_clients)
    client = zmq.utils.z85.decode(keys.client.public)
    server = zmq.utils.z85.decode(keys.server.public)
    assert policy.decide(zap_request(b"CURVE", client)).allowed
    assert not policy.decide(zap_request(b"CURVE", server)).allowed
    assert not policy.decide(zap_request(b"CURVE", b"x" * 32)).allowed
    assert not policy.decide(zap_request(b"CURVE", client[:31])).allowed
    assert not policy.decide(zap_request(b"NULL")).allowed
    assert not policy.decide(zap_request(b"PLAIN", b"user", b"pass")).allowed
    assert zap_request(b"CURVE", client).address == "10.0.0.9"
    assert isinstance(parse_request([b"1.0", b"7"]), str)
    assert isinstance(parse_request([b"2.0", b"7", b"", b"", b"", b"CURVE", client]), str)


def test_a_curve_server_refuses_to_bind_without_its_zap_handler(tmp_path: Path) -> None:
    # Without a ZAP handler libzmq admits every client key: never bind like that.
    auth = MeshAuth(create_keys(tmp_path / "k"), "t")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(RuntimeError, match="run_zap"):
            auth.serve(sock)
    finally:
        sock.close(linger=0)
        ctx.term()


# ------------------------------------------------------------------ real sockets


def plaintext(keys: MeshKeys, other: MeshKeys) -> Callable[[zmq.Socket[bytes]], None]:
    return lambda sock: None


def foreign_client_key(keys: MeshKeys, other: MeshKeys) -> Callable[[zmq.Socket[bytes]], None]:
    """Knows the server's public key, presents another mesh's client key."""
    return MeshKeys(server=keys.server, client=other.client).connect


def wrong_server_key(keys: MeshKeys, other: MeshKeys) -> Callable[[zmq.Socket[bytes]], None]:
    """Holds the mesh's client key but expects another server."""
    return MeshKeys(server=other.server, client=keys.client).connect


async def wait_until(predicate: Callable[[], bool]) -> None:
    # A counter bumped inside libzmq's handshake has no event to wait on: poll it.
    with anyio.fail_after(DEADLINE_S):
        while not predicate():
            await anyio.sleep(0.01)


@pytest.mark.anyio
@pytest.mark.parametrize("intruder", [plaintext, foreign_client_key, wrong_server_key])
async def test_a_peer_without_the_key_gets_nothing_through(
    ipc_dir: Path, intruder: Callable[[MeshKeys, MeshKeys], Callable[[zmq.Socket[bytes]], None]]
) -> None:
    keys = create_keys(ipc_dir / "keys")
    other = create_keys(ipc_dir / "other")
    addr = f"ipc://{ipc_dir}/r.sock"
    ctx = zmq.asyncio.Context()
    server_auth = MeshAuth(keys, "kvcache")
    router = RouterEndpoint(ctx, addr, Identity("kvcache", 0), Abort, heartbeat_s=0.05,
                            auth=server_auth)
    # The intruder and the keyed replica live in a context of their own, as another
    # process's sockets would.
    peer_ctx = zmq.asyncio.Context()
    raw = peer_ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.IDENTITY, b"scheduler/0")
    intruder(keys, other)(raw)
    replica = DealerEndpoint(peer_ctx, addr, Identity("scheduler", 1), Abort, heartbeat_s=0.05,
                             auth=MeshAuth(keys, "scheduler"))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server_auth.run_zap, ctx)
            await tg.start(router.run)
            raw.connect(addr)
            # A hello-shaped first message and work: neither may reach the router.
            await raw.send_multipart([b"\x93\x01\x02\xa3x/0", b"\x01"])
            await wait_until(lambda: server_auth.failures >= 1)
            await tg.start(replica.run)
            joined = await anext_event(router, PeerJoined)
            assert joined.peer.name == "scheduler/1"
            await replica.send(Abort(request_ids=["keyed"]))
            got = await anext_event(router, Received)
            assert got.body == Abort(request_ids=["keyed"])
            # The intruder's frames never reached the message layer: nothing was
            # decoded, rejected or answered for it.
            assert router.rejections.count == 0
            assert list(router.peers_of("scheduler")) == [joined.peer]
            assert not await raw.poll(100)
            tg.cancel_scope.cancel()
    finally:
        raw.close(linger=0)
        replica.close()
        router.close()
        peer_ctx.destroy(linger=0)
        ctx.destroy(linger=0)


async def anext_event(endpoint: RouterEndpoint[Abort], kind: type) -> object:
    with anyio.fail_after(DEADLINE_S):
        async for event in endpoint.inbox:
            assert isinstance(event, PeerJoined | Received), event
            if isinstance(event, kind):
                return event
    raise AssertionError("inbox closed")


def test_refusals_from_ever_new_peers_use_bounded_memory() -> None:
    # Every refused peer (a new ipc pid, a new IP) is a new sender to the log.
    refusals = RejectionLog("kvcache", window_s=0.0, event="peer refused")
    for n in range(3 * MAX_SENDERS_TRACKED):
        refusals.record(f"10.0.{n // 256}.{n % 256}", "client key not allowed")
    assert refusals.count == 3 * MAX_SENDERS_TRACKED
    assert len(refusals._last_logged) <= MAX_SENDERS_TRACKED + 1
