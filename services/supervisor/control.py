"""The control socket behind `meshserve status|restart|scale|down`.

It is a ROUTER of its own (``control.sock`` in the run dir), apart from the
health ROUTER the children heartbeat to: the CLI is not a mesh replica and never
says hello, and keeping it off the health socket means a CLI can never be
mistaken for a child (or a child's garbage for a command).

Framing is the mesh's: ``[envelope, body]`` after the routing frame, bodies from
``shared/protocol/control.py``. Every request gets exactly one answer, garbage
included (``ControlReply(ok=False)``). Requests run concurrently (a restart waits
for the new process to be healthy; a status must not queue behind it), bounded
by ``max_concurrent``: beyond it the answer is "busy".

With mesh keys (always under ``meshserve up``) it is a CURVE server like every
other binding socket, and the CLI connects with the mesh's client key from the
key dir: a local process without the key cannot stop or rescale the mesh.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import msgspec
import zmq
import zmq.asyncio
from anyio.abc import TaskStatus
from opentelemetry import trace

from services.supervisor.mesh_plan import CONTROL_SOCKET, curve_dir
from shared.curve import MeshKeys, load_keys
from shared.frames import FrameWriter, decode_frames
from shared.logs import get_logger
from shared.mesh import Identity, RejectionLog
from shared.mesh_auth import MeshAuth
from shared.protocol.control import (
    ControlReply,
    MeshStatus,
    RestartRequest,
    ScaleRequest,
    ShutdownRequest,
    StatusRequest,
)
from shared.protocol.envelope import Envelope
from shared.telemetry import context_of, tracer

log = get_logger("meshserve.supervisor.control")

ControlRequest = StatusRequest | RestartRequest | ScaleRequest | ShutdownRequest
ControlAnswer = MeshStatus | ControlReply
Handler = Callable[[ControlRequest], Awaitable[ControlAnswer]]


def control_address(run_dir: Path) -> str:
    return f"ipc://{run_dir / CONTROL_SOCKET}"


def mesh_keys(run_dir: Path) -> MeshKeys:
    """The keys a CLI command reaches the mesh of ``run_dir`` with (``meshserve up``
    made them); CurveKeyError, naming the dir, when they cannot be read."""
    return load_keys(curve_dir(run_dir, os.environ))


class ControlServer:
    """Decodes control requests, runs ``handler`` per request, sends its answer."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        identity: Identity,
        handler: Handler,
        *,
        max_concurrent: int = 16,
        auth: MeshAuth | None = None,
    ) -> None:
        self.address = address
        self.auth = auth
        self.identity = identity
        self._handler = handler
        self._limit = anyio.CapacityLimiter(max_concurrent)
        self._decoder = msgspec.msgpack.Decoder(ControlRequest)
        self._writer = FrameWriter(identity.name)
        self._send_lock = anyio.Lock()
        self.rejections = RejectionLog(f"{identity.name}@{address}")
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # A CLI that gave up waiting is gone: its answer raises instead of queueing.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        handshakes = self.auth.serve(self.socket) if self.auth is not None else None
        try:
            self.socket.bind(self.address)
        except zmq.ZMQError as e:
            raise OSError(f"cannot bind {self.address}: {e}") from e
        try:
            async with anyio.create_task_group() as tg:
                if self.auth is not None and handshakes is not None:
                    tg.start_soon(self.auth.watch, self.socket, handshakes,
                                  self.rejections.endpoint)
                task_status.started()
                while True:
                    frames = await self.socket.recv_multipart()
                    peer, payload = frames[0], frames[1:]
                    decoded = decode_frames(payload, self._decoder)
                    if isinstance(decoded, str):
                        self.rejections.record(peer.hex(), decoded)
                        await self._answer(peer, ControlReply(ok=False, message=decoded))
                        continue
                    if self._limit.available_tokens < 1:
                        busy = ControlReply(ok=False, message="supervisor busy; retry")
                        await self._answer(peer, busy)
                        continue
                    tg.start_soon(self._serve, peer, *decoded)
        finally:
            self.socket.close(linger=0)

    async def _serve(self, peer: bytes, envelope: Envelope, request: ControlRequest) -> None:
        async with self._limit:
            span_name = f"supervisor {type(request).__name__}"
            with tracer("meshserve.supervisor").start_as_current_span(
                span_name, context=context_of(envelope), kind=trace.SpanKind.SERVER
            ):
                answer = await self._handler(request)
                await self._answer(peer, answer)

    async def _answer(self, peer: bytes, answer: ControlAnswer) -> None:
        async with self._send_lock:
            try:
                await self.socket.send_multipart([peer, *self._writer.frames(answer)])
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                log.info("control client left before its answer", answer=type(answer).__name__)


class ControlTimeout(TimeoutError):
    pass


class ControlClient:
    """The CLI's side: one blocking request/answer over a DEALER."""

    def __init__(self, run_dir: Path, keys: MeshKeys | None = None) -> None:
        """``keys``: the mesh's, read from the run dir's key dir when not given."""
        self.address = control_address(run_dir)
        self._keys = keys or mesh_keys(run_dir)
        self._writer = FrameWriter(f"cli/{os.getpid()}")
        self._decoder = msgspec.msgpack.Decoder(ControlAnswer)

    def request(self, body: ControlRequest, timeout_s: float) -> ControlAnswer:
        ctx = zmq.Context()
        socket = ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        self._keys.connect(socket)
        try:
            socket.connect(self.address)
            socket.send_multipart(self._writer.frames(body))
            if not socket.poll(int(timeout_s * 1000), zmq.POLLIN):
                raise ControlTimeout(
                    f"the supervisor at {self.address} did not answer within {timeout_s:g} s"
                )
            frames = socket.recv_multipart()
        finally:
            socket.close(linger=0)
            ctx.term()
        if len(frames) != 2:
            raise ValueError(f"malformed answer from the supervisor ({len(frames)} frames)")
        return self._decoder.decode(frames[1])
