"""Send fuzzed frames at a live meshserve socket and check after every batch that the
process behind it still answers (tests/wire_fuzz.py draws the frames).

Two shapes, as the socket rule makes them:

- ``RouterTarget``: a singleton's bound ROUTER. The fuzzer connects DEALERs like a
  replica: one sends the fuzz (after a hello, so bodies get past "work before hello"
  and reach the actor), one probes with a Hello and waits for the Welcome.
- ``DealerTarget``: a replica's DEALER connected to a ROUTER the test binds. The
  fuzzer learns the replica's identity from its hello and sends the fuzz to it; the
  probe is a real request the replica must answer.

Replies are drained as they come so no queue fills up on either side.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from shared.curve import MeshKeys
from shared.protocol.common import Hello, Welcome
from shared.protocol.envelope import PROTOCOL_VERSION
from tests.wire_fuzz import real_frames

PROBE_TIMEOUT_S = 30.0  # a loaded 2-core CI machine; a hang is far longer than this

_decode_any = msgspec.msgpack.Decoder()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _dealer(ctx: zmq.Context[Any], address: str, identity: bytes,
            keys: MeshKeys | None = None) -> zmq.Socket[Any]:
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IDENTITY, identity)
    socket.setsockopt(zmq.SNDHWM, 100_000)
    if keys is not None:
        # A mesh started by `meshserve up` speaks CURVE: with its keys the fuzzed
        # frames reach the service's decoder, which is what is under test.
        keys.connect(socket)
    socket.connect(address)
    return socket


def drain(socket: zmq.Socket[Any]) -> list[list[bytes]]:
    got = []
    while True:
        try:
            got.append(socket.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return got


def wait_for(socket: zmq.Socket[Any], match: Callable[[list[bytes]], bool],
             what: str, timeout_s: float = PROBE_TIMEOUT_S) -> list[bytes]:
    """The first message ``match`` accepts; everything before it is dropped."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if socket.poll(int(left * 1000), zmq.POLLIN):
            frames = socket.recv_multipart()
            if match(frames):
                return frames
    raise AssertionError(f"no answer within {timeout_s:g} s: {what}")


def stack_dump(pid: int, log: Callable[[], str]) -> str:
    """The stalled service's threads, as its SIGUSR1 handler writes them to its log
    (shared/service.py), for the message of the assertion that found the stall."""
    if not pid_alive(pid):
        return f"(the process is gone) its log:\n{log()[-8000:]}"
    os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)
    return log()[-8000:]


def body_of(frame: bytes) -> Any:
    try:
        return _decode_any.decode(frame)
    except msgspec.DecodeError:
        return None


def tagged(frames: list[bytes], tag: str) -> bool:
    body = body_of(frames[-1])
    return isinstance(body, dict) and body.get("type") == tag


@dataclass
class RouterTarget:
    """A singleton's ROUTER at ``address``, in process ``pid``."""

    ctx: zmq.Context[Any]
    address: str
    pid: int
    hello: Hello | None
    probe_frames: list[bytes] = field(default_factory=list)
    probe_answer: str = "Welcome"
    keys: MeshKeys | None = None
    sent: int = 0

    def __post_init__(self) -> None:
        name = os.path.basename(self.address)
        self.fuzz = _dealer(self.ctx, self.address, f"fuzz-{name}".encode(), self.keys)
        self.probe = _dealer(self.ctx, self.address, f"probe-{name}".encode(), self.keys)
        if not self.probe_frames:
            self.probe_frames = real_frames(Hello(service="fuzzprobe", replica=99,
                                                  incarnation="probe", protocol=PROTOCOL_VERSION,
                                                  pid=1),
                                            sender="fuzzprobe/99")

    def send(self, batch: list[list[bytes]], keep: Callable[[list[bytes]], bool]) -> None:
        if self.hello is not None:
            self.fuzz.send_multipart(real_frames(self.hello, sender="fuzz/90"))
        for frames in batch:
            if keep(frames):
                self.fuzz.send_multipart(frames)
                self.sent += 1
            drain(self.fuzz)
        self.check()

    def check(self) -> None:
        assert pid_alive(self.pid), f"the process behind {self.address} died"
        drain(self.probe)
        self.probe.send_multipart(self.probe_frames)
        wait_for(self.probe, lambda f: tagged(f, self.probe_answer),
                 f"{self.probe_answer} from {self.address}")
        drain(self.fuzz)

    def close(self) -> None:
        self.fuzz.close(linger=0)
        self.probe.close(linger=0)


@dataclass
class DealerTarget:
    """A replica's DEALER, connected to ``router`` (bound by the test)."""

    router: zmq.Socket[Any]
    pid: int
    log: Callable[[], str] = lambda: ""  # the replica's log, for a stall's stack dump
    identity: bytes = b""
    service: str = ""
    sent: int = 0

    def wait_hello(self, service: str) -> None:
        """The replica's hello; answered with a Welcome, as its singleton would."""
        self.identity = self._hello(service)
        self.service = service
        self.welcome()

    def _hello(self, service: str) -> bytes:
        """The identity of the replica's next hello; a stall of two minutes fails with
        the replica's stacks."""
        try:
            frames = wait_for(self.router, lambda f: tagged(f, "Hello"), f"{service}'s hello",
                              timeout_s=120.0)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{stack_dump(self.pid, self.log)}") from None
        return frames[0]

    def welcome(self) -> None:
        welcome = real_frames(Welcome("fuzz", "fuzz"), "fuzz/0")
        try:
            self.router.send_multipart([self.identity, *welcome])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            # Reconnecting (see ``send``): its next hello names it again.
            self.identity = self._hello(self.service)
            self.router.send_multipart([self.identity, *welcome])

    def send(self, batch: list[list[bytes]]) -> None:
        for frames in batch:
            try:
                self.router.send_multipart([self.identity, *frames])
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                # The replica reconnected (an upstream silent for 3 beats is lost to
                # it, and this test beats only when it probes): greet it again.
                self.wait_hello(self.service)
                self.router.send_multipart([self.identity, *frames])
            self.sent += 1
            for reply in drain(self.router):
                if tagged(reply, "Hello"):
                    self.welcome()
        assert pid_alive(self.pid), "the replica died"
