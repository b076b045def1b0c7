"""A ZAP handler (ZeroMQ RFC 27): who may complete a CURVE handshake with us.

libzmq asks the handler bound at ``inproc://zeromq.zap.01`` of a socket's context
about every peer that completes the CURVE key exchange with a socket that has a
ZAP domain; the peer gets no frame through before the answer is 200. The policy
is pure (``ZapPolicy``); ``ZapHandler`` is the thin actor around a REP socket.

    libzmq session ──[version, request id, domain, address, identity, mechanism,
                      credentials...]──▶ handler
    libzmq session ◀──[version, request id, status, text, user id, metadata]── handler
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import zmq
import zmq.asyncio
from anyio.abc import TaskStatus

from shared.mesh import RejectionLog

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
CURVE_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class ZapRequest:
    request_id: bytes
    domain: bytes
    address: str  # the peer's IP for tcp; empty for ipc
    mechanism: bytes
    credentials: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ZapVerdict:
    status: bytes  # b"200" admits, b"400" refuses, b"500" for a request we cannot read
    text: str

    @property
    def allowed(self) -> bool:
        return self.status == b"200"


def parse_request(frames: list[bytes]) -> ZapRequest | str:
    """The request in ``frames``, or why it is not one."""
    if len(frames) < 6:
        return f"ZAP request of {len(frames)} frames, expected at least 6"
    version, request_id, domain, address, _identity, mechanism, *credentials = frames
    if version != ZAP_VERSION:
        return f"ZAP version {version!r}, expected {ZAP_VERSION!r}"
    return ZapRequest(request_id, domain, address.decode(errors="replace"), mechanism,
                      tuple(credentials))


class ZapPolicy:
    """Admits CURVE peers whose public key is one of ``allowed``; refuses the rest."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self.allowed = allowed

    def decide(self, request: ZapRequest) -> ZapVerdict:
        if request.mechanism != b"CURVE":
            return ZapVerdict(b"400", f"mechanism {request.mechanism.decode(errors='replace')} "
                              "refused; the mesh speaks CURVE only")
        if len(request.credentials) != 1 or len(request.credentials[0]) != CURVE_KEY_BYTES:
            return ZapVerdict(b"400", "malformed CURVE credentials")
        if request.credentials[0] not in self.allowed:
            return ZapVerdict(b"400", "client key not allowed")
        return ZapVerdict(b"200", "OK")


def reply_frames(request_id: bytes, verdict: ZapVerdict) -> list[bytes]:
    return [ZAP_VERSION, request_id, verdict.status, verdict.text.encode(), b"", b""]


class ZapHandler:
    """Answers the ZAP requests of one ZMQ context; each refusal is recorded in
    ``refusals`` with the peer's address."""

    def __init__(self, ctx: zmq.asyncio.Context, policy: ZapPolicy,
                 refusals: RejectionLog) -> None:
        self.policy = policy
        self.refusals = refusals
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started, answer until cancelled. Start it before any CURVE
        server binds in the context: with no handler, libzmq admits every key."""
        try:
            self.socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            self.socket.close(linger=0)
            raise OSError(f"cannot bind the ZAP handler ({e}); one per ZMQ context") from e
        try:
            task_status.started()
            while True:
                frames = await self.socket.recv_multipart()
                await self.socket.send_multipart(self._answer(frames))
        finally:
            self.socket.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        request = parse_request(frames)
        if isinstance(request, str):
            # A REP socket must answer before it can receive again.
            self.refusals.record("zap", request)
            request_id = frames[1] if len(frames) > 1 else b""
            return reply_frames(request_id, ZapVerdict(b"500", request))
        verdict = self.policy.decide(request)
        if not verdict.allowed:
            self.refusals.record(request.address or "local peer", verdict.text)
        return reply_frames(request.request_id, verdict)
