"""The supervisor actor: starts the mesh, watches it, restarts, scales, stops it.

    supervisor ── spawn ──▶ child processes (own process group, PDEATHSIG)
    supervisor ◀── Hello(ready) every beat ── children   (health ROUTER)
    supervisor ◀── status/restart/scale/down ── CLI      (control ROUTER)

Each child has a ``ChildSlot`` (slot.py) whose task owns its processes: start,
wait for the exit, restart or give up (one_for_one). This module starts and stops
the slots, folds the health socket's hellos into them, and serves the operator's
commands; it acts on a child only through its slot (``stop``, ``kill``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import zmq.asyncio
from anyio.abc import TaskGroup, TaskStatus

from services.supervisor.children import Child
from services.supervisor.control import ControlRequest, ControlServer, control_address
from services.supervisor.mesh_plan import (
    AT_LEAST_ONE,
    DRAINS_FIRST,
    SCALABLE,
    SINGLETONS,
    START_ORDER,
    STOP_ORDER,
    MeshSettings,
)
from services.supervisor.process import service_command
from services.supervisor.restart_policy import RestartPolicy
from services.supervisor.slot import ChildSlot, SlotHooks
from services.supervisor.zygote_client import ZygoteClient
from shared.child_process import ChildProcess, spawn_child
from shared.curve import ensure_keys
from shared.endpoints import bind_router
from shared.logs import get_logger
from shared.mesh import Identity, PeerJoined, PeerLost, RouterEndpoint
from shared.mesh_auth import MeshAuth
from shared.protocol.common import Rejected
from shared.protocol.control import (
    ControlReply,
    MeshStatus,
    RestartRequest,
    ScaleRequest,
    ShutdownRequest,
    StatusRequest,
)
from shared.service import ServiceRuntime

# Replicas of one service on one host, at most (scale beyond with more hosts).
MAX_REPLICAS = 64

log = get_logger("meshserve.supervisor")

ReadyCallback = Callable[[bool, str], None]


class Supervisor:
    """One mesh. ``run`` returns the exit code: 0 after a requested shutdown,
    1 when it gave up (restart intensity, startup deadline)."""

    def __init__(
        self,
        settings: MeshSettings,
        *,
        command: Callable[[str], list[str]] = service_command,
        on_ready: ReadyCallback | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.settings = settings
        self.config = settings.supervisor
        self.beat_s = settings.process.heartbeat_s
        self.identity = Identity("supervisor", 0)
        self.policy = RestartPolicy(
            max_restarts=self.config.restart_intensity,
            period_s=self.config.restart_period_s,
            backoff_initial_s=self.config.backoff_initial_s,
            backoff_max_s=self.config.backoff_max_s,
            backoff_reset_s=self.config.backoff_reset_s,
        )
        self.exit_code = 0
        self._command = command
        self._on_ready = on_ready
        # Off when embedded (tests): signal handlers belong to the main program.
        self._handle_signals = handle_signals
        self._ready_reported = False
        self._slots: dict[tuple[str, int], ChildSlot] = {}
        self._shutdown = anyio.Event()
        self._shutdown_reason = ""
        self._changed = anyio.Event()
        self._operations = anyio.Lock()
        self._children_tg: TaskGroup | None = None
        self._health: RouterEndpoint[Rejected] | None = None
        self._unknown_hellos: set[str] = set()
        # A custom command (tests' stand-ins) is no `python -m services.X`: no zygote.
        self._zygote = (
            ZygoteClient(settings.child_env("zygote", 0))
            if self.config.zygote and command is service_command
            else None
        )

    # ----------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        ctx = zmq.asyncio.Context()
        curve_dir = self.settings.process.curve_dir
        # Created here if absent (`meshserve up` is what makes a mesh's keys).
        auth = MeshAuth(ensure_keys(Path(curve_dir)), "supervisor") if curve_dir else None
        # The supervisor is the health socket's singleton, set up like any other.
        runtime = ServiceRuntime(self.identity, self.settings.process, self.settings.addresses,
                                 ctx, auth=auth)
        health: RouterEndpoint[Rejected] = bind_router(
            runtime, self.settings.addresses.supervisor_addr, Rejected
        )
        self._health = health
        control = ControlServer(
            ctx, control_address(self.settings.run_dir), self.identity, self._on_control,
            auth=auth,
        )
        try:
            async with anyio.create_task_group() as infra:
                if self._handle_signals:
                    await infra.start(self._watch_signals)
                if auth is not None:
                    await infra.start(auth.run_zap, ctx)
                await infra.start(health.run)
                await infra.start(control.run)
                infra.start_soon(self._watch_hellos, health)
                infra.start_soon(self._watch_liveness)
                if self._zygote is not None:
                    await infra.start(self._zygote.run)
                async with anyio.create_task_group() as children:
                    self._children_tg = children
                    log.info(
                        "starting mesh",
                        run_dir=str(self.settings.run_dir),
                        model=self.settings.model,
                        replicas=self.settings.replicas(),
                    )
                    for service in START_ORDER:
                        for replica in range(self.settings.replicas()[service]):
                            self._add_child(service, replica)
                    infra.start_soon(self._watch_startup)
                    task_status.started()
                    await self._shutdown.wait()
                    await self._stop_all()
                infra.cancel_scope.cancel()
        finally:
            ctx.destroy(linger=0)
            if not self._ready_reported:
                self._report_ready(False, self._shutdown_reason or "supervisor stopped")
        log.info("mesh stopped", exit_code=self.exit_code, reason=self._shutdown_reason)
        return self.exit_code

    @property
    def stop_reason(self) -> str:
        """Why the mesh is stopping ("" while it runs)."""
        return self._shutdown_reason

    def request_shutdown(self, reason: str, *, failed: bool = False) -> None:
        """Idempotent: begin the ordered shutdown (the first reason wins)."""
        if self._shutdown.is_set():
            return
        if failed:
            self.exit_code = 1
        self._shutdown_reason = reason
        self._shutdown.set()
        self._notify()

    async def _watch_signals(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._shutdown.is_set():
                    log.info("shutting down", signal=name)
                    self.request_shutdown(f"received {name}")
                else:
                    # A second Ctrl-C means "now": no more draining.
                    log.warning("second signal: killing every child", signal=name)
                    for slot in self._slots.values():
                        slot.child.stopping = True
                        slot.wake.set()
                        slot.kill(f"second {name}")

    async def _watch_startup(self) -> None:
        deadline_s = self.config.startup_timeout_s
        with anyio.move_on_after(deadline_s):
            await self.wait_until(lambda: self._shutdown.is_set() or self.mesh_healthy())
        if self._shutdown.is_set():
            return
        if self.mesh_healthy():
            log.info("mesh healthy", api_url=self.settings.api_url)
            self._report_ready(True, self.settings.api_url)
            return
        unhealthy = [f"{s.child.name} ({s.child.state})" for s in self._live_slots()
                     if not s.child.healthy(time.monotonic(), self.beat_s)]
        reason = f"mesh not healthy within {deadline_s:g} s: {', '.join(unhealthy)}"
        log.error("startup failed", reason=reason)
        self.request_shutdown(reason, failed=True)

    def _report_ready(self, ok: bool, message: str) -> None:
        if self._ready_reported:
            return
        self._ready_reported = True
        if self._on_ready is not None:
            self._on_ready(ok, message)

    # ------------------------------------------------------------------ children

    def _add_child(self, service: str, replica: int) -> ChildSlot:
        assert self._children_tg is not None
        slot = ChildSlot(Child(service, replica), self._slot_hooks(service))
        self._slots[(service, replica)] = slot
        self._children_tg.start_soon(slot.supervise, name=f"child {service}/{replica}")
        return slot

    def _slot_hooks(self, service: str) -> SlotHooks:
        stop_timeout_s = self.config.stop_timeout_s
        if service == DRAINS_FIRST:
            # It drains on SIGTERM: its requests get shutdown_timeout_s to finish
            # (the rest of the mesh keeps serving them meanwhile, STOP_ORDER).
            stop_timeout_s += self.config.shutdown_timeout_s
        return SlotHooks(
            spawn=self._spawn,
            policy=self.policy,
            stop_timeout_s=stop_timeout_s,
            changed=self._notify,
            give_up=partial(self.request_shutdown, failed=True),
        )

    async def _spawn(self, child: Child) -> ChildProcess:
        env = self.settings.child_env(child.service, child.replica)
        argv = self._command(child.service)
        if self._zygote is not None and (forked := await self._zygote.fork(argv, env)):
            return forked
        return await spawn_child(argv, env)

    async def _stop_all(self) -> None:
        log.info("stopping mesh", reason=self._shutdown_reason)
        for service in STOP_ORDER:
            slots = [s for s in self._slots.values() if s.child.service == service]
            async with anyio.create_task_group() as tg:
                for slot in slots:
                    tg.start_soon(slot.stop)

    def _live_slots(self) -> list[ChildSlot]:
        return [s for s in self._slots.values() if not s.done.is_set()]

    def mesh_healthy(self) -> bool:
        now = time.monotonic()
        live = self._live_slots()
        return bool(live) and all(s.child.healthy(now, self.beat_s) for s in live)

    # -------------------------------------------------------------------- health

    async def _watch_hellos(self, health: RouterEndpoint[Rejected]) -> None:
        async for event in health.inbox:
            if isinstance(event, PeerJoined):
                self._match_peers()
                self._notify()
            elif isinstance(event, PeerLost):
                for slot in self._slots.values():
                    if slot.peer is event.peer:
                        slot.peer = None
            else:
                log.warning("unexpected message on the health socket", kind=type(event).__name__)

    def _match_peers(self) -> None:
        """Attach each hello to the process that sent it (by pid): a hello from a
        replica's previous process, or from a process we did not start, must not
        make the current one look healthy."""
        assert self._health is not None
        for peer in list(self._health.peers.values()):
            hello = peer.hello
            slot = self._slots.get((hello.service, hello.replica))
            if slot is not None and slot.peer is peer:
                continue
            if slot is not None and slot.child.pid == hello.pid:
                slot.peer = peer
                continue
            key = f"{hello.service}/{hello.replica}:{hello.incarnation}"
            stranger = slot is None or hello.pid not in slot.past_pids
            if stranger and key not in self._unknown_hellos:
                self._unknown_hellos.add(key)
                log.warning(
                    "hello from a process this supervisor did not start",
                    child=f"{hello.service}/{hello.replica}",
                    pid=hello.pid,
                    expected_pid=slot.child.pid if slot else None,
                )

    async def _watch_liveness(self) -> None:
        """Every beat: fold the latest hellos into the child records, kill the
        unresponsive, reset backoffs of the proven, and wake health waiters.

        Health is defined over time (hello within three beats), and the health
        ROUTER refreshes a known peer silently, so this periodic pass is the
        event source for health changes; it orders nothing."""
        while True:
            await anyio.sleep(self.beat_s)
            self._match_peers()
            now = time.monotonic()
            for slot in self._slots.values():
                child = slot.child
                if slot.peer is not None:
                    hello = slot.peer.hello
                    child.heard(hello.ready, slot.peer.last_seen, hello.busy_s)
                healthy_for = child.update_health(now, self.beat_s)
                if healthy_for:
                    self.policy.on_healthy(child.service, child.replica, healthy_for)
                problem = child.liveness_problem(now, self.beat_s, self.config.hello_timeout_s,
                                                 self.config.step_timeout_s)
                if problem and slot.kill_reason is None and slot.process is not None:
                    log.error("child unresponsive; killing it", child=child.name, reason=problem)
                    slot.kill(problem)
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; re-checked on every change of a child
        (start, exit, hello) and every heartbeat. Bound it with a deadline."""
        while not predicate():
            await self._changed.wait()

    # ------------------------------------------------------------------- control

    async def _on_control(self, request: ControlRequest) -> MeshStatus | ControlReply:
        match request:
            case StatusRequest():
                return self.status()
            case ShutdownRequest():
                self.request_shutdown("shutdown requested")
                return ControlReply(ok=True, message="mesh stopping")
            case RestartRequest():
                return await self._restart(request)
            case ScaleRequest():
                return await self._scale(request)
        return ControlReply(ok=False, message=f"unsupported request {type(request).__name__}")

    def status(self) -> MeshStatus:
        now = time.monotonic()
        order = {service: i for i, service in enumerate(START_ORDER)}
        slots = sorted(
            self._slots.values(),
            key=lambda s: (order.get(s.child.service, len(order)), s.child.replica),
        )
        return MeshStatus(
            supervisor_pid=os.getpid(),
            api_url=self.settings.api_url,
            model=self.settings.model,
            healthy=not self._shutdown.is_set() and self.mesh_healthy(),
            children=[s.child.status(now, self.beat_s) for s in slots],
            zygote=self._zygote.status() if self._zygote is not None else None,
        )

    def _refuse_if_stopping(self) -> ControlReply | None:
        if self._shutdown.is_set():
            return ControlReply(ok=False, message=f"mesh is stopping: {self._shutdown_reason}")
        return None

    async def _wait_healthy(
        self, slots: list[ChildSlot], old_pids: set[int]
    ) -> ControlReply | None:
        """Wait until every slot runs a new, healthy process; an error reply if not."""
        deadline_s = self.config.startup_timeout_s

        def settled() -> bool:
            now = time.monotonic()
            return self._shutdown.is_set() or all(
                s.child.healthy(now, self.beat_s) and s.child.pid not in old_pids for s in slots
            )

        with anyio.move_on_after(deadline_s):
            await self.wait_until(settled)
        if refused := self._refuse_if_stopping():
            return refused
        if not settled():
            names = ", ".join(s.child.name for s in slots)
            return ControlReply(ok=False, message=f"{names} not healthy within {deadline_s:g} s")
        return None

    async def _restart(self, request: RestartRequest) -> ControlReply:
        async with self._operations:
            if refused := self._refuse_if_stopping():
                return refused
            slots = [
                s
                for s in self._live_slots()
                if s.child.service == request.service
                and (request.replica is None or s.child.replica == request.replica)
            ]
            if not slots:
                what = request.service + (
                    f"/{request.replica}" if request.replica is not None else ""
                )
                known = sorted({f"{s.child.name}" for s in self._live_slots()})
                return ControlReply(
                    ok=False, message=f"no child {what}; running: {', '.join(known)}"
                )
            old = {s.child.pid for s in slots if s.child.pid is not None}
            log.info("restart requested", children=[s.child.name for s in slots])
            async with anyio.create_task_group() as tg:
                for slot in slots:
                    tg.start_soon(partial(slot.stop, restart=True))
            if failed := await self._wait_healthy(slots, old):
                return failed
            summary = ", ".join(f"{s.child.name} (pid {s.child.pid})" for s in slots)
            return ControlReply(ok=True, message=f"restarted {summary}")

    async def _scale(self, request: ScaleRequest) -> ControlReply:
        service, wanted = request.service, request.replicas
        if service in SINGLETONS:
            return ControlReply(
                ok=False, message=f"{service} is a singleton and cannot be scaled"
            )
        if service not in SCALABLE:
            return ControlReply(
                ok=False,
                message=f"unknown service {service!r}; scalable: {', '.join(sorted(SCALABLE))}",
            )
        minimum = 1 if service in AT_LEAST_ONE else 0
        if wanted < minimum:
            return ControlReply(ok=False, message=f"{service} needs at least {minimum} replica")
        if wanted > MAX_REPLICAS:
            # One host's processes: a typo (or a hostile peer) must not fork-bomb it.
            return ControlReply(ok=False, message=f"{service}: at most {MAX_REPLICAS} replicas "
                                f"on one host, asked for {wanted}")
        async with self._operations:
            if refused := self._refuse_if_stopping():
                return refused
            current = sorted(
                (s for s in self._live_slots() if s.child.service == service),
                key=lambda s: s.child.replica,
            )
            if wanted > len(current):
                next_id = current[-1].child.replica + 1 if current else 0
                missing = range(wanted - len(current))
                added = [self._add_child(service, next_id + i) for i in missing]
                log.info("scaling up", scaled_service=service, replicas=wanted)
                if failed := await self._wait_healthy(added, set()):
                    return failed
            elif wanted < len(current):
                removed = current[wanted:]
                log.info("scaling down", scaled_service=service, replicas=wanted)
                async with anyio.create_task_group() as tg:
                    for slot in removed:
                        tg.start_soon(slot.stop)
                for slot in removed:
                    del self._slots[(service, slot.child.replica)]
                    self.policy.forget(service, slot.child.replica)
                self._notify()
            return ControlReply(ok=True, message=f"{service} has {wanted} replica(s)")


