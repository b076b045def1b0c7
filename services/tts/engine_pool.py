"""``EngineProcessPool``: the ``EngineBackend`` made of engine processes, one per slot.

Each slot is kept alive by its own task: start ``python -m services.tts.engine_proc``
with a fresh PAIR socket (a new address per start, so a dead engine's pipe can never
be mistaken for the new one), wait for its ``EngineReady``, relay its audio, and when
the process exits (crash, or ``restart``'s kill) report ``SlotLost`` and start it
again. Engines are started and rate limited with the supervisor's own primitive
(``shared.child_process``): each dies with the replica (PDEATHSIG), and too many
restarts in a window make the pool raise, taking the replica down loudly instead
of spinning.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import zmq
import zmq.asyncio
from anyio.abc import ObjectSendStream, TaskStatus

from services.tts.engines.base import BackendEvent, SlotAudio, SlotLost, SlotReady
from shared.child_process import RestartWindow, spawn_child
from shared.logs import get_logger
from shared.mesh_auth import MeshAuth
from shared.protocol.speech import (
    EngineAudio,
    EngineCancel,
    EngineEvent,
    EngineReady,
    EngineSynthesize,
)

log = get_logger("meshserve.tts.engines")

REPO_ROOT = Path(__file__).resolve().parents[2]


class EngineCrashLoop(RuntimeError):
    """Engines keep dying; restarting them again would only hide the cause."""


@dataclass(slots=True)
class _EngineProcess:
    slot: int
    generation: int
    socket: zmq.asyncio.Socket
    process: asyncio.subprocess.Process | None = None
    ready: EngineReady | None = None
    kill_reason: str | None = None


class EngineProcessPool:
    """``slots`` engine processes of engine ``engine``, with sockets under ``workdir``."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        engine: str,
        slots: int,
        workdir: Path,
        replica: int,
        start_timeout_s: float = 30.0,
        log_level: str = "info",
        auth: MeshAuth | None = None,
    ) -> None:
        self.slots = slots
        # With mesh keys the engine sockets are CURVE like every other: the engine
        # process reads the same MESHSERVE_CURVE_DIR from the environment it inherits.
        self._auth = auth
        self._ctx = ctx
        self._engine = engine
        self._workdir = workdir
        self._replica = replica
        self._start_timeout_s = start_timeout_s
        self._log_level = log_level
        self._engines: dict[int, _EngineProcess] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineEvent)
        self._restart_window = RestartWindow(max_restarts=5, period_s=30.0)
        self.restarts = 0

    async def run(
        self,
        events: ObjectSendStream[BackendEvent],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        async with events, anyio.create_task_group() as tg:
            for slot in range(self.slots):
                tg.start_soon(self._keep_slot, slot, events)
            task_status.started()

    async def start_job(self, slot: int, job: EngineSynthesize) -> None:
        engine = self._engines.get(slot)
        if engine is None or engine.ready is None:
            # The engine died after the actor last heard from it; its SlotLost is on
            # the way and re-queues the job.
            log.info("job for an engine that is gone", slot=slot, job_id=job.job_id)
            return
        await engine.socket.send(self._encoder.encode(job))

    async def cancel_job(self, slot: int, job_id: int) -> None:
        engine = self._engines.get(slot)
        if engine is not None and engine.ready is not None:
            await engine.socket.send(self._encoder.encode(EngineCancel(job_id)))

    def restart(self, slot: int, reason: str) -> None:
        engine = self._engines.get(slot)
        if engine is not None and engine.process is not None and engine.kill_reason is None:
            log.warning("killing engine", slot=slot, pid=engine.process.pid, reason=reason)
            engine.kill_reason = reason
            engine.process.kill()

    def pids(self) -> list[int]:
        return [e.process.pid for e in self._engines.values() if e.process is not None]

    async def _keep_slot(self, slot: int, events: ObjectSendStream[BackendEvent]) -> None:
        generation = 0
        while True:
            generation += 1
            reason = await self._run_engine(slot, generation, events)
            await events.send(SlotLost(slot, reason))
            self.restarts += 1
            window = self._restart_window
            if not window.record(time.monotonic()):
                raise EngineCrashLoop(
                    f"tts engines died more than {window.max_restarts} times within "
                    f"{window.period_s:.0f} s (last: slot {slot}, {reason}); see the "
                    "engine logs above"
                )
            log.warning("restarting engine", slot=slot, reason=reason)

    async def _run_engine(
        self, slot: int, generation: int, events: ObjectSendStream[BackendEvent]
    ) -> str:
        """Run one engine process until it exits; the reason it is gone."""
        path = self._workdir / f"engine-{slot}-{generation}.sock"
        socket = self._ctx.socket(zmq.PAIR)
        socket.setsockopt(zmq.LINGER, 0)
        handshakes = self._auth.serve(socket) if self._auth is not None else None
        socket.bind(f"ipc://{path}")
        engine = _EngineProcess(slot, generation, socket)
        self._engines[slot] = engine
        try:
            engine.process = await spawn_child(
                [sys.executable, "-m", "services.tts.engine_proc"],
                self._engine_env(slot, path),
                cwd=REPO_ROOT,
            )
            async with anyio.create_task_group() as tg:
                if self._auth is not None and handshakes is not None:
                    tg.start_soon(self._auth.watch, socket, handshakes, f"tts engine {slot}")
                tg.start_soon(self._relay, engine, events)
                code = await engine.process.wait()
                tg.cancel_scope.cancel()
            if engine.kill_reason is not None:
                return engine.kill_reason
            return f"engine process exited with {code}"
        finally:
            self._engines.pop(slot, None)
            with anyio.CancelScope(shield=True):
                if engine.process is not None and engine.process.returncode is None:
                    engine.process.kill()
                    await engine.process.wait()
            socket.close(linger=0)
            path.unlink(missing_ok=True)

    def _engine_env(self, slot: int, path: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MESHSERVE_ENGINE_ADDR=f"ipc://{path}",
            MESHSERVE_ENGINE=self._engine,
            MESHSERVE_ENGINE_SLOT=str(slot),
            MESHSERVE_REPLICA=str(self._replica),
            MESHSERVE_LOG_LEVEL=self._log_level,
            PYTHONPATH=os.pathsep.join(
                p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
            ),
        )
        return env

    async def _relay(self, engine: _EngineProcess, events: ObjectSendStream[BackendEvent]) -> None:
        """The one receiving task of this engine's socket. It is cancelled only when
        the process is gone and the socket is discarded, so no message can be lost."""
        # The one timed-out recv in the pool: if it fires the engine is killed and its
        # socket discarded, so a message lost with the cancelled recv cannot matter.
        first: EngineEvent | None = None
        with anyio.move_on_after(self._start_timeout_s):
            first = await self._next_event(engine, "hello")
        if not isinstance(first, EngineReady):
            # Garbage restarted it already (restart is idempotent); silence or a
            # wrong first message did not.
            self.restart(engine.slot, "engine did not report ready in time")
            return
        engine.ready = first
        await events.send(SlotReady(engine.slot, first))
        while (event := await self._next_event(engine, "message")) is not None:
            if isinstance(event, EngineAudio):
                await events.send(SlotAudio(engine.slot, event))
            else:
                self.restart(engine.slot, f"unexpected {type(event).__name__} from engine")
                return

    async def _next_event(self, engine: _EngineProcess, what: str) -> EngineEvent | None:
        """The engine's next message; None once it spoke garbage (it is restarted)."""
        frame = await engine.socket.recv()
        try:
            event: EngineEvent = self._decoder.decode(frame)
        except msgspec.DecodeError as e:
            # Our own child speaking garbage is a bug: restart it, loudly.
            self.restart(engine.slot, f"undecodable engine {what}: {e}")
            return None
        return event
