"""``ChildSlot``: one child and the task that owns its processes.

The slot's ``supervise`` task is the one place where a child's process starts and
the one place where its exit is handled: start it, wait for it to exit, then ask
the ``RestartPolicy`` (one_for_one: only this child restarts). Everything else
(heartbeat checks, operator commands, shutdown) acts on a child by setting its
intent (``stopping`` / ``restarting``) and signalling its process; the task sees
the exit and does the rest.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from services.supervisor.children import Child, ChildState
from services.supervisor.restart_policy import GiveUp, RestartPolicy
from shared.child_process import ChildProcess, signal_process
from shared.logs import get_logger
from shared.mesh import Peer

log = get_logger("meshserve.supervisor")

Spawn = Callable[[Child], Awaitable[ChildProcess]]


@dataclass(frozen=True, slots=True)
class SlotHooks:
    """What a slot needs from its supervisor: how to start a process, the restart
    rules, how long a stop may take, and whom to tell about changes."""

    spawn: Spawn
    policy: RestartPolicy
    stop_timeout_s: float
    changed: Callable[[], None]  # a child started, exited or stopped
    give_up: Callable[[str], None]  # the restart intensity was exceeded: stop the mesh


@dataclass(eq=False)
class ChildSlot:
    """A child record plus the I/O handles its task uses."""

    child: Child
    hooks: SlotHooks
    process: ChildProcess | None = None
    # Ends a backoff wait early (a stop or an operator restart arrived).
    wake: anyio.Event = field(default_factory=anyio.Event)
    # Set when the slot's task returned: the child will not start again.
    done: anyio.Event = field(default_factory=anyio.Event)
    peer: Peer | None = None  # the health ROUTER's Peer of the current process
    kill_reason: str | None = None
    # Every pid this slot ever ran: their late hellos are expected, not strangers.
    past_pids: set[int] = field(default_factory=set)

    async def supervise(self) -> None:
        """Own this child's processes until it is stopped or its service gives up."""
        child = self.child
        try:
            while not child.stopping:
                code = await self._run_once()
                if child.stopping:
                    break
                if child.restarting:
                    child.restarts += 1
                    log.info("child restarting on request", child=child.name, exit_code=code)
                    continue
                if not await self._back_off(code):
                    return
            child.state = ChildState.STOPPED
            log.info("child stopped", child=child.name)
        finally:
            # Cancelled from outside (not our ordered stop): leave no orphan behind,
            # even where PDEATHSIG would only fire when this whole process exits.
            if self.process is not None:
                signal_process(self.process, signal.SIGKILL)
            self.done.set()
            self.hooks.changed()

    async def _run_once(self) -> int | None:
        """Start one process and wait for its exit; its exit code (None: no start)."""
        child = self.child
        self.wake = anyio.Event()
        self.kill_reason = None
        code: int | None = None
        try:
            process = await self.hooks.spawn(child)
        except OSError as e:
            log.error("cannot start child", child=child.name, error=str(e))
        else:
            self.process = process
            child.spawned(process.pid, time.monotonic())
            self.past_pids.add(process.pid)
            log.info("child started", child=child.name, pid=process.pid)
            self.hooks.changed()
            if child.stopping:
                # The stop arrived while this process was being started, so
                # whoever stopped us could not signal it: do it here.
                await self.terminate()
            code = await process.wait()
        self.peer = None
        child.exited()
        self.hooks.changed()
        return code

    async def _back_off(self, code: int | None) -> bool:
        """After an unplanned exit: wait out the backoff; False when giving up."""
        child = self.child
        decision = self.hooks.policy.on_exit(child.service, child.replica, time.monotonic())
        log.warning(
            "child exited",
            child=child.name,
            exit_code=code,
            reason=self.kill_reason or "exited on its own",
        )
        if isinstance(decision, GiveUp):
            child.state = ChildState.FAILED
            log.error("giving up", failed_service=decision.service, reason=decision.reason)
            self.hooks.give_up(decision.reason)
            return False
        child.state = ChildState.BACKOFF
        child.restarts += 1
        log.info("child restart scheduled", child=child.name, delay_s=decision.delay_s)
        with anyio.move_on_after(decision.delay_s):
            await self.wake.wait()
        return True

    async def stop(self, *, restart: bool = False) -> None:
        """SIGTERM the child's process, SIGKILL after the deadline, wait for its exit.
        Without ``restart`` also wait until its task ended (it will not start again)."""
        child = self.child
        if restart:
            child.restarting = True
        else:
            child.stopping = True
        self.wake.set()
        if child.alive:
            await self.terminate()
        if not restart:
            await self.done.wait()

    async def terminate(self) -> None:
        """SIGTERM the current process; SIGKILL it after the stop deadline.
        Returns once the process has exited."""
        process = self.process
        if process is None or not signal_process(process, signal.SIGTERM):
            return
        with anyio.move_on_after(self.hooks.stop_timeout_s):
            await process.wait()
        if process.returncode is None:
            log.warning(
                "child did not stop in time; killing",
                child=self.child.name,
                timeout_s=self.hooks.stop_timeout_s,
            )
            signal_process(process, signal.SIGKILL)
            await process.wait()

    def kill(self, reason: str) -> None:
        """SIGKILL the current process now (unresponsive, or a second Ctrl-C);
        the task sees the exit. Only the first reason of a process is kept."""
        if self.process is None:
            return
        if self.kill_reason is None:
            self.kill_reason = reason
        signal_process(self.process, signal.SIGKILL)
