"""CURVE for one process's sockets: keys, the ZAP handler and the refusal count.

A process with a key dir (``ProcessConfig.curve_dir``) builds one ``MeshAuth``,
starts its ZAP handler before any socket binds (``shared/service.py`` does), and
hands it to every endpoint: a binding socket ``serve``s and has its failed
handshakes ``watch``ed, a connecting one ``connect``s. Without a key dir the
sockets stay plaintext, as the message-level tests that start one service use.

Every peer refused is counted once in ``refusals`` (``count`` is what the api's
``/metrics`` shows as ``meshserve:zmq_auth_failures_total``) and logged at most
once per peer per 10 s:

- a key the ZAP handler does not admit: by the handler, with the peer's address;
- no CURVE at all, or a wrong server key: the handshake fails before ZAP is
  asked, so by a monitor on the socket, under the socket's own address.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import zmq
import zmq.asyncio
from anyio.abc import TaskStatus
from zmq.utils.monitor import parse_monitor_message

from shared.curve import MeshKeys, load_keys
from shared.mesh import RejectionLog
from shared.zap import ZapHandler, ZapPolicy

# Handshake failures ZAP never sees. EVENT_HANDSHAKE_FAILED_AUTH is left out: that
# is a ZAP refusal, which the handler records already (with the peer's address).
WATCHED_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "peer without CURVE (plaintext)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "peer with a wrong server key",
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: "CURVE key exchange failed",
}


def handshake_failure(event: dict[str, object]) -> str:
    """Why a monitored handshake failed, in words."""
    value = event.get("value")
    if not isinstance(value, int):
        return "handshake failed"
    if event.get("event") == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return PROTOCOL_REASONS.get(value, f"handshake protocol error {value:#x}")
    # NO_DETAIL carries an errno: most often the peer hung up mid-handshake, as a
    # plaintext peer does after its first refusal.
    return f"handshake failed ({os.strerror(value)})"


class MeshAuth:
    """What a process's endpoints need to speak CURVE."""

    def __init__(self, keys: MeshKeys, name: str) -> None:
        self.keys = keys
        self.refusals = RejectionLog(name, event="peer refused")
        self._zap_running = False

    @classmethod
    def from_dir(cls, key_dir: str | Path, name: str) -> MeshAuth:
        return cls(load_keys(Path(key_dir)), name)

    @property
    def failures(self) -> int:
        return self.refusals.count

    async def run_zap(
        self, ctx: zmq.asyncio.Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The ZAP handler of ``ctx``, until cancelled."""
        handler = ZapHandler(ctx, ZapPolicy(self.keys.allowed_clients), self.refusals)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(handler.run)
                self._zap_running = True
                task_status.started()
        finally:
            self._zap_running = False

    def serve(self, socket: zmq.asyncio.Socket) -> zmq.asyncio.Socket:
        """Make ``socket`` a CURVE server (before it binds, and only once the ZAP
        handler runs: a CURVE server without one admits any client key). Returns the
        socket's handshake monitor, attached before the first peer can arrive, for
        ``watch``."""
        if not self._zap_running:
            raise RuntimeError("start MeshAuth.run_zap before binding a CURVE socket")
        self.keys.serve(socket)
        return socket.get_monitor_socket(WATCHED_EVENTS)

    def connect(self, socket: zmq.Socket[bytes]) -> None:
        self.keys.connect(socket)

    async def watch(self, socket: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket,
                    endpoint: str) -> None:
        """Count the handshakes of a bound ``socket`` that fail before ZAP (from the
        ``monitor`` that ``serve`` returned), until cancelled. Monitor events are
        statistics: losing one to cancellation at shutdown costs nothing."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                self.refusals.record(endpoint, handshake_failure(event))
        finally:
            if not socket.closed:
                socket.disable_monitor()
            monitor.close(linger=0)
