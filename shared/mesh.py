"""The actor runtime: typed ZMQ endpoints that feed bounded anyio streams.

Socket rule (DESIGN.md): singletons bind a ``RouterEndpoint``; replicas connect a
``DealerEndpoint`` to each singleton they serve and say ``Hello`` before they get
work. The Hello doubles as the heartbeat, so a singleton that restarted re-learns
its replicas within one beat, and each Hello is answered with a ``Welcome`` whose
incarnation lets the replica notice a restarted singleton.

Each endpoint has exactly one receiving task. It decodes frames and puts typed
events on a bounded memory stream that the actor reads; nothing ever cancels a
pending ``recv`` (pyzmq may lose the message), callers time out on the stream.
Garbage never escapes the receiver: it is logged (rate-limited per sender),
counted, and answered with ``Rejected`` where there is a reply path.

    actor ──send()──▶ [zmq socket] ─ ─ ─▶ peer
    actor ◀──inbox──  receiver task ◀── [zmq socket]
"""

from __future__ import annotations

import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import anyio
import msgspec
import zmq
import zmq.asyncio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry.context import Context

from shared.config import MISSED_BEATS_DEAD
from shared.frames import FrameWriter, decode_frames
from shared.logs import get_logger
from shared.protocol.common import Hello, Rejected, Welcome
from shared.protocol.envelope import PROTOCOL_VERSION, Envelope
from shared.telemetry import context_of

if TYPE_CHECKING:
    from shared.mesh_auth import MeshAuth

log = get_logger("meshserve.mesh")

Body = TypeVar("Body")

INBOX_SIZE = 4096
# A RejectionLog beyond this many senders forgets those it has not logged lately.
MAX_SENDERS_TRACKED = 1024


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this process is on the mesh."""

    service: str
    replica: int
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def name(self) -> str:
        return f"{self.service}/{self.replica}"

    def hello(self, **extra: Any) -> Hello:
        return Hello(
            service=self.service,
            replica=self.replica,
            incarnation=self.incarnation,
            protocol=PROTOCOL_VERSION,
            pid=os.getpid(),
            **extra,
        )


@dataclass(slots=True)
class Peer:
    """A replica connected to a router, as last announced by its Hello."""

    identity: bytes
    hello: Hello
    last_seen: float

    @property
    def name(self) -> str:
        return f"{self.hello.service}/{self.hello.replica}"


@dataclass(frozen=True, slots=True)
class Received(Generic[Body]):
    """A decoded message. ``peer`` is None on a dealer (the sender is the singleton)."""

    peer: Peer | None
    envelope: Envelope
    body: Body

    @property
    def context(self) -> Context:
        return context_of(self.envelope)


@dataclass(frozen=True, slots=True)
class PeerJoined:
    peer: Peer


@dataclass(frozen=True, slots=True)
class PeerLost:
    """A peer stopped beating, restarted under a new incarnation, or became
    unreachable; whatever it held must be re-queued or failed."""

    peer: Peer
    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamJoined:
    """The singleton answered; ``restarted`` when it is a new incarnation."""

    welcome: Welcome
    restarted: bool


@dataclass(frozen=True, slots=True)
class UpstreamLost:
    reason: str


class RejectionLog:
    """Counts rejected messages (or, with another ``event``, refused peers) and
    logs at most once per sender per window."""

    def __init__(self, endpoint: str, window_s: float = 10.0,
                 event: str = "message rejected") -> None:
        self.endpoint = endpoint
        self.event = event
        self.count = 0
        self._window_s = window_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def record(self, sender: str, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if len(self._last_logged) > MAX_SENDERS_TRACKED:
            self._forget_quiet_senders(now)
        last = self._last_logged.get(sender)
        if last is not None and now - last < self._window_s:
            self._suppressed[sender] = self._suppressed.get(sender, 0) + 1
            return
        self._last_logged[sender] = now
        log.warning(
            self.event,
            endpoint=self.endpoint,
            sender=sender,
            reason=reason,
            suppressed_since_last=self._suppressed.pop(sender, 0),
            rejected_total=self.count,
        )


    def _forget_quiet_senders(self, now: float) -> None:
        """Bound the memory peers with ever new names (or addresses) can make us use."""
        for sender, last in list(self._last_logged.items()):
            if now - last >= self._window_s:
                del self._last_logged[sender]
                self._suppressed.pop(sender, None)


class _Endpoint(ABC, Generic[Body]):
    """What routers and dealers share: framing, encoding, the inbox, rejection, and
    the shape of ``run``. A kind of endpoint says its socket type, how it configures
    the socket (``_configure``), how it attaches (bind or connect), how it watches
    its peers' liveness and how it receives."""

    _SOCKET_TYPE: ClassVar[int]

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        identity: Identity,
        body_type: Any,
        *,
        heartbeat_s: float,
        inbox_size: int = INBOX_SIZE,
        auth: MeshAuth | None = None,
    ) -> None:
        self.address = address
        self.identity = identity
        self.heartbeat_s = heartbeat_s
        # CURVE when the process has mesh keys; plaintext otherwise (shared/mesh_auth.py).
        self.auth = auth
        self.socket = ctx.socket(self._SOCKET_TYPE)
        self.socket.setsockopt(zmq.LINGER, 0)
        self._decoder = msgspec.msgpack.Decoder(body_type | Hello | Welcome | Rejected)
        self._writer = FrameWriter(identity.name)
        self.rejections = RejectionLog(f"{identity.name}@{address}")
        send, receive = anyio.create_memory_object_stream[Any](inbox_size)
        self._inbox_send: MemoryObjectSendStream[Any] = send
        self.inbox: MemoryObjectReceiveStream[Any] = receive
        self._closed = False
        self._configure()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Attach, report started, then receive (and watch liveness) until cancelled.
        A failure to attach reaches whoever started the endpoint; the socket closes
        however the run ends."""
        self._attach()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_liveness)
                task_status.started()
                await self._receive_forever()
        finally:
            self.close()

    @abstractmethod
    def _configure(self) -> None:
        """Socket options and state of this kind of endpoint (called by ``__init__``)."""

    @abstractmethod
    def _attach(self) -> None:
        """Bind or connect the socket."""

    @abstractmethod
    async def _watch_liveness(self) -> None:
        """Runs beside the receiver for as long as the endpoint runs."""

    @abstractmethod
    async def _receive_forever(self) -> None:
        """Decode every frame and put what it means on the inbox."""

    def _decode(self, frames: list[bytes]) -> tuple[Envelope, Any] | str:
        return decode_frames(frames, self._decoder)

    def close(self) -> None:
        """Idempotent: close the socket at once (linger 0) and end the inbox."""
        if self._closed:
            return
        self._closed = True
        self._inbox_send.close()
        self.socket.close(linger=0)


class RouterEndpoint(_Endpoint[Body]):
    """A singleton's bound ROUTER: tracks replicas by their Hello heartbeats."""

    _SOCKET_TYPE = zmq.ROUTER
    peers: dict[bytes, Peer]

    def _configure(self) -> None:
        # MANDATORY: a send to a vanished peer raises instead of dropping silently.
        # HANDOVER: a restarted replica reclaims its identity from the stale pipe.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.peers = {}
        # With CURVE: the monitor counting failed handshakes (shared/mesh_auth.py).
        self._handshakes: zmq.asyncio.Socket | None = None

    def _attach(self) -> None:
        if self.auth is not None:
            self._handshakes = self.auth.serve(self.socket)
        try:
            self.socket.bind(bind_address(self.address))
        except zmq.ZMQError as e:
            raise OSError(f"cannot bind {self.address}: {e}") from e

    async def _watch_liveness(self) -> None:
        async with anyio.create_task_group() as tg:
            auth, handshakes = self.auth, self._handshakes
            if auth is not None and handshakes is not None:
                tg.start_soon(auth.watch, self.socket, handshakes, self.rejections.endpoint)
            await self._reap_silent_peers()

    def peers_of(self, service: str) -> list[Peer]:
        return [p for p in self.peers.values() if p.hello.service == service]

    async def send(self, peer: Peer | bytes, body: Any, ctx: Context | None = None) -> bool:
        """Send to one peer; False (and the peer is dropped) if it is gone."""
        identity = peer.identity if isinstance(peer, Peer) else peer
        try:
            await self.socket.send_multipart([identity, *self._writer.frames(body, ctx)])
        except zmq.Again:
            # The peer's queue is full (ROUTER_MANDATORY says so rather than dropping
            # quietly): it does not read. The message is lost to it, not this process.
            self.rejections.record(identity.decode(errors="replace"),
                                   f"{type(body).__name__} dropped: the peer's queue is full")
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            gone = self.peers.pop(identity, None)
            if gone is not None:
                await self._inbox_send.send(PeerLost(gone, "unreachable"))
            return False
        return True

    async def _receive_forever(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            identity, payload = frames[0], frames[1:]
            decoded = self._decode(payload)
            if isinstance(decoded, str):
                self.rejections.record(identity.decode(errors="replace"), decoded)
                await self.send(identity, Rejected(reason=decoded))
                continue
            envelope, body = decoded
            if isinstance(body, Hello):
                await self._on_hello(identity, body)
                continue
            peer = self.peers.get(identity)
            if peer is None:
                # Work from a replica that never said hello (or that we reaped):
                # refuse it, the replica's next Hello re-registers it.
                reason = f"{type(body).__name__} from {envelope.sender} before its hello"
                self.rejections.record(envelope.sender, reason)
                await self.send(identity, Rejected(reason=reason, msg_id=envelope.msg_id))
                continue
            peer.last_seen = time.monotonic()
            if isinstance(body, Welcome | Rejected):
                self.rejections.record(envelope.sender, f"unexpected {type(body).__name__}")
                continue
            await self._inbox_send.send(Received(peer, envelope, body))

    async def _on_hello(self, identity: bytes, hello: Hello) -> None:
        if hello.protocol != PROTOCOL_VERSION:
            reason = f"protocol {hello.protocol} unsupported, this build speaks {PROTOCOL_VERSION}"
            self.rejections.record(f"{hello.service}/{hello.replica}", reason)
            await self.send(identity, Rejected(reason=reason))
            return
        now = time.monotonic()
        known = self.peers.get(identity)
        if known is not None and known.hello.incarnation == hello.incarnation:
            known.hello = hello
            known.last_seen = now
        else:
            if known is not None:
                await self._inbox_send.send(PeerLost(known, "restarted"))
            peer = Peer(identity, hello, now)
            self.peers[identity] = peer
            await self._inbox_send.send(PeerJoined(peer))
        welcome = Welcome(service=self.identity.service, incarnation=self.identity.incarnation)
        await self.send(identity, welcome)

    async def _reap_silent_peers(self) -> None:
        """Reap the replicas that stopped beating."""
        deadline = self.heartbeat_s * MISSED_BEATS_DEAD
        while True:
            await anyio.sleep(self.heartbeat_s)
            now = time.monotonic()
            for identity, peer in list(self.peers.items()):
                if now - peer.last_seen > deadline:
                    del self.peers[identity]
                    await self._inbox_send.send(PeerLost(peer, "missed heartbeats"))


class DealerEndpoint(_Endpoint[Body]):
    """A replica's connection to one singleton: hello, heartbeats, and work."""

    _SOCKET_TYPE = zmq.DEALER

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        identity: Identity,
        body_type: Any,
        *,
        heartbeat_s: float,
        hello: Callable[[], Hello] | None = None,
        inbox_size: int = INBOX_SIZE,
        auth: MeshAuth | None = None,
    ) -> None:
        super().__init__(
            ctx, address, identity, body_type, heartbeat_s=heartbeat_s, inbox_size=inbox_size,
            auth=auth,
        )
        self._hello = hello or identity.hello
        self.upstream: Welcome | None = None
        self._known_incarnation: str | None = None
        self._last_welcome = 0.0

    def _configure(self) -> None:
        self.socket.setsockopt(zmq.IDENTITY, self.identity.name.encode())
        # Reconnect quickly after a singleton restart; the default backs off to 100 ms+.
        self.socket.setsockopt(zmq.RECONNECT_IVL, 50)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 500)

    @property
    def connected(self) -> bool:
        """The singleton answered within the last three beats."""
        return self.upstream is not None

    def _attach(self) -> None:
        if self.auth is not None:
            self.auth.connect(self.socket)
        self.socket.connect(self.address)

    async def send(self, body: Any, ctx: Context | None = None) -> None:
        await self.socket.send_multipart(self._writer.frames(body, ctx))

    async def say_hello(self) -> None:
        await self.send(self._hello())

    async def _watch_liveness(self) -> None:
        """Say hello every beat; the singleton is lost after ``MISSED_BEATS_DEAD`` beats
        without a Welcome."""
        deadline = self.heartbeat_s * MISSED_BEATS_DEAD
        while True:
            await self.say_hello()
            await anyio.sleep(self.heartbeat_s)
            if self.upstream is not None and time.monotonic() - self._last_welcome > deadline:
                self.upstream = None
                await self._inbox_send.send(UpstreamLost("missed heartbeats"))

    async def _receive_forever(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            decoded = self._decode(frames)
            if isinstance(decoded, str):
                # The singleton is our only peer; answering garbage with garbage
                # would loop, so a dealer only logs and counts.
                self.rejections.record(self.address, decoded)
                continue
            envelope, body = decoded
            if isinstance(body, Welcome):
                self._last_welcome = time.monotonic()
                was_connected = self.upstream is not None
                self.upstream = body
                known = self._known_incarnation
                self._known_incarnation = body.incarnation
                if not was_connected or known != body.incarnation:
                    restarted = known is not None and known != body.incarnation
                    await self._inbox_send.send(UpstreamJoined(body, restarted=restarted))
                continue
            if isinstance(body, Rejected):
                # Most often "work before hello" after the singleton restarted:
                # introduce ourselves again at once rather than at the next beat.
                await self.say_hello()
            if isinstance(body, Hello):
                self.rejections.record(envelope.sender, "unexpected Hello on a dealer")
                continue
            await self._inbox_send.send(Received(None, envelope, body))


def bind_address(address: str) -> str:
    """Where a singleton binds for an address its replicas connect to.

    In containers replicas connect to ``tcp://scheduler:5556`` (a service name), but
    a socket binds interfaces, not names: bind every interface on that port.
    """
    if address.startswith("tcp://"):
        _, _, port = address[len("tcp://"):].rpartition(":")
        return f"tcp://*:{port}"
    return address

