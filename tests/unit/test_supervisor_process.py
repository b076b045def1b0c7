"""The supervisor over real child processes: start order, health from real hello
heartbeats, restarts after kill -9 and after a child hangs (SIGSTOP), giving up
when a service cannot start, operator restart and scale over the real control
socket, and ordered shutdown.

kvcache and scheduler run as the real services; the other services run as
stand-ins: real processes that go through ``shared.service.serve`` (so they say
hello to the supervisor exactly like a real service) without loading a model.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from services.supervisor.control import ControlClient, mesh_keys
from services.supervisor.mesh_plan import Flags, MeshSettings, resolve_settings
from services.supervisor.process import service_command
from services.supervisor.run_dir import wait_for_exit
from services.supervisor.service import Supervisor
from shared.protocol.control import (
    ControlReply,
    MeshStatus,
    RestartRequest,
    ScaleRequest,
    StatusRequest,
)

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 0.2
DEADLINE_S = 60.0

STAND_IN = r"""
import os, sys
service = sys.argv[1]
if service in os.environ.get("STAND_IN_CRASH", "").split(","):
    sys.exit(3)
import anyio
from shared.service import serve

async def main(runtime):
    runtime.ready = service not in os.environ.get("STAND_IN_UNREADY", "").split(",")
    await anyio.sleep_forever()

serve(service, main)
log = os.environ.get("STAND_IN_STOP_LOG")
if log:
    with open(log, "a") as f:
        f.write(f"{service}/{os.environ['MESHSERVE_REPLICA']}\n")
"""


def stand_in(service: str) -> list[str]:
    return [sys.executable, "-c", STAND_IN, service]


def real_singletons(service: str) -> list[str]:
    """The real kvcache and scheduler; stand-ins for services with a model."""
    if service in ("kvcache", "scheduler"):
        return service_command(service)
    return stand_in(service)


def make_settings(run_dir: Path, *sets: str, **env: str) -> MeshSettings:
    environ = {**os.environ, "MESHSERVE_HEARTBEAT_S": str(HEARTBEAT_S), **env}
    # Quick backoff keeps the tests short; intensity stays as configured per test.
    flags = Flags(run_dir=str(run_dir), settings=["backoff_max_s=0.5", *sets])
    return resolve_settings(flags, environ)


@dataclass
class Mesh:
    supervisor: Supervisor
    ready: anyio.Event = field(default_factory=anyio.Event)
    outcome: list[tuple[bool, str]] = field(default_factory=list)
    exit_code: int | None = None

    def on_ready(self, ok: bool, message: str) -> None:
        self.outcome.append((ok, message))
        self.ready.set()

    async def wait_ready(self) -> None:
        with anyio.fail_after(DEADLINE_S):
            await self.ready.wait()
        assert self.outcome[0][0], self.outcome

    def child(self, service: str, replica: int = 0):  # -> ChildStatus
        return next(
            c
            for c in self.supervisor.status().children
            if (c.service, c.replica) == (service, replica)
        )

    async def wait(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(DEADLINE_S):
            await self.supervisor.wait_until(predicate)

    async def wait_replaced(self, service: str, old_pid: int, replica: int = 0) -> None:
        def replaced() -> bool:
            child = self.child(service, replica)
            return child.healthy and child.pid not in (None, old_pid)

        await self.wait(replaced)


@asynccontextmanager
async def supervised(
    settings: MeshSettings, command: Callable[[str], list[str]] = real_singletons
) -> AsyncIterator[Mesh]:
    mesh = Mesh(supervisor=None)  # type: ignore[arg-type]
    mesh.supervisor = Supervisor(
        settings, command=command, on_ready=mesh.on_ready, handle_signals=False
    )

    async def run() -> None:
        mesh.exit_code = await mesh.supervisor.run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            yield mesh
        finally:
            mesh.supervisor.request_shutdown("test over")


async def gone(pid: int) -> bool:
    return await anyio.to_thread.run_sync(wait_for_exit, pid, 10.0)


async def ask(run_dir: Path, body: object, timeout_s: float = DEADLINE_S):
    client = ControlClient(run_dir)
    return await anyio.to_thread.run_sync(client.request, body, timeout_s)


async def test_mesh_starts_healthy_and_stops_in_order(ipc_dir: Path) -> None:
    stop_log = ipc_dir / "stopped.txt"
    settings = make_settings(ipc_dir, "tokenizers=2", STAND_IN_STOP_LOG=str(stop_log))
    async with supervised(settings, command=stand_in) as mesh:
        await mesh.wait_ready()
        status = mesh.supervisor.status()
        assert status.healthy and status.api_url == settings.api_url
        names = [(c.service, c.replica) for c in status.children]
        assert names == [
            ("kvcache", 0), ("scheduler", 0), ("api", 0),
            ("tokenizer", 0), ("tokenizer", 1), ("worker", 0), ("tts", 0),
        ]
        assert all(c.healthy and c.state == "running" and c.pid for c in status.children)
        pids = [c.pid for c in status.children]
    assert mesh.exit_code == 0
    for pid in pids:
        assert await gone(pid)
    stopped = [line.split("/")[0] for line in stop_log.read_text().split()]
    # Replicas of one service stop together; services strictly in order.
    assert stopped == ["api", "tokenizer", "tokenizer", "tts", "scheduler", "worker", "kvcache"]


async def test_kill_9_of_any_child_is_repaired(ipc_dir: Path) -> None:
    async with supervised(make_settings(ipc_dir)) as mesh:
        await mesh.wait_ready()
        for service in ("worker", "kvcache", "scheduler", "tokenizer", "api"):
            old = mesh.child(service)
            assert old.pid is not None
            os.kill(old.pid, signal.SIGKILL)
            await mesh.wait_replaced(service, old.pid)
            assert mesh.child(service).restarts == old.restarts + 1
        await mesh.wait(lambda: mesh.supervisor.status().healthy)
    assert mesh.exit_code == 0


async def test_a_hung_child_is_killed_and_restarted(ipc_dir: Path) -> None:
    async with supervised(make_settings(ipc_dir), command=stand_in) as mesh:
        await mesh.wait_ready()
        old = mesh.child("tokenizer")
        assert old.pid is not None
        # Alive to waitpid, silent on the mesh: only the heartbeat can tell.
        os.kill(old.pid, signal.SIGSTOP)
        await mesh.wait_replaced("tokenizer", old.pid)
        assert await gone(old.pid)
    assert mesh.exit_code == 0


async def test_a_service_that_cannot_start_makes_the_supervisor_give_up(ipc_dir: Path) -> None:
    settings = make_settings(
        ipc_dir, "restart_intensity=2", "restart_period_s=120", STAND_IN_CRASH="worker"
    )
    async with supervised(settings, command=stand_in) as mesh:
        with anyio.fail_after(DEADLINE_S):
            await mesh.ready.wait()
        ok, reason = mesh.outcome[0]
        assert not ok and "worker restarted more than 2 times" in reason
    assert mesh.exit_code == 1
    status = mesh.supervisor.status()
    worker = next(c for c in status.children if c.service == "worker")
    assert worker.state == "failed" and worker.restarts == 2
    assert all(c.pid is None for c in status.children)
    assert {c.state for c in status.children if c.service != "worker"} == {"stopped"}


async def test_a_mesh_not_healthy_by_the_deadline_fails_naming_the_laggard(
    ipc_dir: Path,
) -> None:
    settings = make_settings(ipc_dir, "startup_timeout_s=3", STAND_IN_UNREADY="worker")
    async with supervised(settings, command=stand_in) as mesh:
        with anyio.fail_after(DEADLINE_S):
            await mesh.ready.wait()
        ok, reason = mesh.outcome[0]
        assert not ok and reason == "mesh not healthy within 3 s: worker/0 (starting)"
    assert mesh.exit_code == 1
    assert all(c.state == "stopped" for c in mesh.supervisor.status().children)


async def test_operator_restart_and_scale_over_the_control_socket(ipc_dir: Path) -> None:
    async with supervised(make_settings(ipc_dir)) as mesh:
        await mesh.wait_ready()
        old = mesh.child("scheduler")
        reply = await ask(ipc_dir, RestartRequest("scheduler"))
        assert isinstance(reply, ControlReply) and reply.ok, reply
        new = mesh.child("scheduler")
        # The answer comes once the new process is healthy.
        assert new.healthy and new.pid != old.pid and new.restarts == old.restarts + 1
        assert await gone(old.pid)  # type: ignore[arg-type]

        reply = await ask(ipc_dir, ScaleRequest("tokenizer", 3))
        assert reply == ControlReply(ok=True, message="tokenizer has 3 replica(s)")
        status = await ask(ipc_dir, StatusRequest())
        assert isinstance(status, MeshStatus) and status.healthy
        tokenizers = [c for c in status.children if c.service == "tokenizer"]
        assert [c.replica for c in tokenizers] == [0, 1, 2]
        assert all(c.healthy for c in tokenizers)

        reply = await ask(ipc_dir, RestartRequest("tokenizer", 1))
        assert isinstance(reply, ControlReply) and reply.ok and "tokenizer/1" in reply.message

        removed = [c.pid for c in tokenizers[1:]]
        reply = await ask(ipc_dir, ScaleRequest("tokenizer", 1))
        assert isinstance(reply, ControlReply) and reply.ok
        assert [c.replica for c in mesh.supervisor.status().children
                if c.service == "tokenizer"] == [0]
        for pid in removed:
            assert await gone(pid)  # type: ignore[arg-type]

        for request, message in (
            (ScaleRequest("api", 2), "singleton"),
            (ScaleRequest("worker", 0), "at least 1"),
            (ScaleRequest("gpu", 1), "unknown service"),
            (ScaleRequest("tokenizer", 10**9), "at most 64 replicas"),
            (RestartRequest("worker", 7), "no child worker/7"),
        ):
            reply = await ask(ipc_dir, request)
            assert isinstance(reply, ControlReply) and not reply.ok
            assert message in reply.message
    assert mesh.exit_code == 0


async def test_control_socket_answers_garbage_and_keeps_serving(ipc_dir: Path) -> None:
    import msgspec
    import zmq

    async with supervised(make_settings(ipc_dir), command=stand_in) as mesh:
        await mesh.wait_ready()

        def send_garbage() -> list[bytes]:
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Garbage from a peer with the mesh's keys: one without gets nothing through.
            mesh_keys(ipc_dir).connect(sock)
            try:
                sock.connect(f"ipc://{ipc_dir}/control.sock")
                sock.send_multipart([b"\x00not an envelope", b"\x01"])
                assert sock.poll(10_000)
                return sock.recv_multipart()
            finally:
                sock.close(linger=0)
                ctx.term()

        frames = await anyio.to_thread.run_sync(send_garbage)
        reply = msgspec.msgpack.decode(frames[1], type=ControlReply)
        assert not reply.ok and "bad envelope" in reply.message
        status = await ask(ipc_dir, StatusRequest())
        assert isinstance(status, MeshStatus) and status.healthy
