"""The supervisor's side of the zygote (zygote.py): starts and supervises it, asks it
for children, and hands out ``ForkedProcess`` handles the slots use like an
``asyncio.subprocess.Process``.

Design: a forked child is the zygote's child, not the supervisor's, so

- its exit code comes from the zygote, which reaps it and reports ``ChildExited``;
- the supervisor signals it through a pidfd the zygote opened before the child could
  be reaped (sent along with ``Forked``), so a recycled pid is never hit;
- it dies with the supervisor through the zygote: the child's PDEATHSIG is tied to
  the zygote, whose PDEATHSIG is tied to the supervisor.

The price of that simplicity: a zygote that dies (only a SIGKILL from outside or the
OOM killer can do it: it runs no threads and no service code) takes its children
with it. Their pidfds turn readable, their slots see an exit (-SIGKILL) and restart
them as after any crash, through the restarted zygote or a plain spawn. The
alternatives cost more than that rare event: a double fork needs the supervisor to
become a child subreaper and then reap every orphan of the tree, and
``clone(CLONE_PARENT)`` skips glibc's and CPython's fork bookkeeping.

Nothing depends on the zygote: ``fork`` returns None whenever it is not ready
(starting, restarting, gone for good, or it refused), and the caller spawns.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import count

import anyio
import msgspec
from anyio.abc import TaskStatus

from shared.child_process import RestartWindow, signal_process, spawn_child
from shared.logs import get_logger
from shared.protocol.control import ZygoteStatus
from shared.protocol.zygote import (
    MAX_PACKET,
    ChildExited,
    Forked,
    ForkFailed,
    ForkRequest,
    ZygoteReady,
    ZygoteReport,
)

log = get_logger("meshserve.supervisor")

# Only the worker is forked: its start is a torch import (2-3 s of a 3-6 s restart).
# The other services import no torch and start in about a second by a plain spawn;
# forked from a process holding torch, each would carry its pages (about 250 MB of
# RSS per process, shared copy-on-write but counted against every service's bound).
FORKED_MODULES = frozenset({"services.worker"})
PRELOAD = ("torch", "services.worker.service")


class ForkedProcess:
    """A service process the zygote forked: pid, ``returncode``, ``wait`` and
    ``send_signal`` as on ``asyncio.subprocess.Process``."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._exited = anyio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, signum)

    def exited(self, returncode: int) -> None:
        """Record the exit (idempotent: the first report wins)."""
        if self.returncode is not None:
            return
        self.returncode = returncode
        os.close(self._pidfd)
        self._exited.set()

    async def wait_gone(self) -> None:
        """Without the zygote's report: wait until the process is gone (its pidfd
        turns readable) and record it as killed, which PDEATHSIG did."""
        if self.returncode is None:
            await anyio.wait_readable(self._pidfd)
            self.exited(-signal.SIGKILL)


@dataclass
class _PendingFork:
    done: anyio.Event = field(default_factory=anyio.Event)
    process: ForkedProcess | None = None
    error: str = ""


def module_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """``[python, -m, MODULE, *ARGS]`` as (MODULE, ARGS); None for any other argv
    (the zygote runs modules under this interpreter only)."""
    if len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m":
        return argv[2], list(argv[3:])
    return None


class ZygoteClient:
    """Run ``run`` in a task group; then ``fork`` gives forked children or None."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        preload: tuple[str, ...] = PRELOAD,
        forked_modules: frozenset[str] = FORKED_MODULES,
        ready_timeout_s: float = 120.0,
        fork_timeout_s: float = 10.0,
        restart_window: RestartWindow | None = None,
    ) -> None:
        self.env = dict(env)
        self.preload = preload
        self.forked_modules = forked_modules
        self.ready_timeout_s = ready_timeout_s
        self.fork_timeout_s = fork_timeout_s
        self.pid: int | None = None  # the current zygote's
        self._window = restart_window or RestartWindow(max_restarts=3, period_s=60.0)
        self._sock: socket.socket | None = None
        self._ready = False
        self._given_up = False
        self._starts = 0
        # Set whenever the zygote is ready or given up: what `fork` waits for.
        self._settled = anyio.Event()
        self._ids = count(1)
        self._pending: dict[int, _PendingFork] = {}
        self._children: dict[int, ForkedProcess] = {}

    @property
    def ready(self) -> bool:
        return self._ready

    def status(self) -> ZygoteStatus:
        """What `meshserve status` shows of the zygote."""
        state = "given-up" if self._given_up else "ready" if self._ready else "starting"
        return ZygoteStatus(pid=self.pid, state=state, restarts=max(0, self._starts - 1))

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep a zygote running; give up (plain spawns from then on) when it keeps
        dying. Cancel to stop it."""
        task_status.started()
        async with anyio.create_task_group() as orphans:
            try:
                while True:
                    await self._run_once(orphans)
                    if not self._window.record(time.monotonic()):
                        log.error("zygote keeps failing; children start by plain spawn")
                        return
                    await anyio.sleep(1.0)
            finally:
                self._given_up = True
                self._settled.set()

    async def _run_once(self, orphans: anyio.abc.TaskGroup) -> None:
        parent_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "services.supervisor.zygote",
                "--fd", str(zygote_end.fileno()), "--preload", ",".join(self.preload)]
        try:
            process = await spawn_child(argv, self.env, pass_fds=(zygote_end.fileno(),))
        except OSError as e:
            log.error("cannot start the zygote", error=str(e))
            parent_end.close()
            return
        finally:
            zygote_end.close()
        self.pid = process.pid
        self._starts += 1
        parent_end.setblocking(False)
        self._sock = parent_end
        try:
            await self._read_reports(parent_end)
        finally:
            self._lost(orphans)
            parent_end.close()
            # The zygote exits once its socket closes; make sure of it.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                signal_process(process, signal.SIGTERM)
                await process.wait()
            signal_process(process, signal.SIGKILL)
        self.pid = None
        log.warning("zygote exited", pid=process.pid, exit_code=process.returncode)

    async def _read_reports(self, sock: socket.socket) -> None:
        decoder = msgspec.msgpack.Decoder(ZygoteReport)
        with anyio.move_on_after(self.ready_timeout_s) as preload_deadline:
            report = await self._receive(sock, decoder)
        if preload_deadline.cancelled_caught or not isinstance(report, ZygoteReady):
            log.error("zygote did not get ready", timeout_s=self.ready_timeout_s)
            return
        log.info("zygote ready", pid=report.pid, preload_s=report.preload_s)
        self._ready = True
        self._settled.set()
        while (report := await self._receive(sock, decoder)) is not None:
            self._on_report(report)

    async def _receive(
        self, sock: socket.socket, decoder: msgspec.msgpack.Decoder[ZygoteReport]
    ) -> ZygoteReport | None:
        """The next report (None: the zygote is gone). Reports are the zygote's
        answers, so one that does not decode means a broken zygote: drop it."""
        while True:
            await anyio.wait_readable(sock)
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, MAX_PACKET, 1)
            except BlockingIOError:
                continue
            if not data:
                return None
            try:
                report = decoder.decode(data)
            except msgspec.DecodeError as e:
                for fd in fds:
                    os.close(fd)
                log.error("malformed report from the zygote; restarting it", error=str(e))
                return None
            if isinstance(report, Forked) and fds:
                self._on_forked(report, fds[0])
                continue
            for fd in fds:
                os.close(fd)
            return report

    def _on_forked(self, report: Forked, pidfd: int) -> None:
        process = ForkedProcess(report.pid, pidfd)
        self._children[report.pid] = process
        pending = self._pending.pop(report.request_id, None)
        if pending is None:
            # Its requester timed out and spawned instead: this one serves nobody.
            process.send_signal(signal.SIGKILL)
            return
        pending.process = process
        pending.done.set()

    def _on_report(self, report: ZygoteReport) -> None:
        match report:
            case ChildExited(pid=pid, returncode=code):
                process = self._children.pop(pid, None)
                if process is not None:
                    process.exited(code)
            case ForkFailed(request_id=request_id, error=error):
                log.warning("zygote could not fork", error=error)
                pending = self._pending.pop(request_id, None)
                if pending is not None:
                    pending.error = error
                    pending.done.set()
            case _:
                log.warning("unexpected report from the zygote", kind=type(report).__name__)

    def _lost(self, orphans: anyio.abc.TaskGroup) -> None:
        """The zygote is gone: pending forks fail (their callers spawn), and its
        children, which die with it, are waited for through their pidfds."""
        self._ready = False
        # Forks waiting for a zygote that failed to start spawn now, not at a timeout.
        self._settled.set()
        self._settled = anyio.Event()
        self._sock = None
        for pending in self._pending.values():
            pending.error = "zygote gone"
            pending.done.set()
        self._pending.clear()
        for process in self._children.values():
            orphans.start_soon(process.wait_gone)
        self._children.clear()

    # --------------------------------------------------------------------- forks

    async def fork(
        self, argv: list[str], env: Mapping[str, str]
    ) -> ForkedProcess | None:
        """A child forked from the zygote running ``argv`` (``python -m MODULE``),
        or None: the caller spawns it instead."""
        command = module_command(argv)
        if command is None or self._given_up or command[0] not in self.forked_modules:
            return None
        if not self._ready:
            # Starting (or restarting): worth waiting for, it is faster than a spawn.
            with anyio.move_on_after(self.ready_timeout_s):
                await self._settled.wait()
        sock = self._sock
        if not self._ready or sock is None:
            return None
        module, args = command
        request_id = next(self._ids)
        pending = self._pending[request_id] = _PendingFork()
        data = msgspec.msgpack.encode(
            ForkRequest(request_id=request_id, module=module, args=args, env=dict(env))
        )
        try:
            await _send(sock, data)
        except OSError as e:
            self._pending.pop(request_id, None)
            log.warning("zygote unreachable", error=str(e))
            return None
        with anyio.move_on_after(self.fork_timeout_s):
            await pending.done.wait()
        self._pending.pop(request_id, None)
        if pending.process is None:
            log.warning("fork through the zygote failed; spawning",
                        module=module, error=pending.error or "timed out")
        return pending.process


async def _send(sock: socket.socket, data: bytes) -> None:
    """One packet on the non-blocking SOCK_SEQPACKET: sent whole or not at all."""
    while True:
        try:
            sock.send(data)
            return
        except BlockingIOError:
            await anyio.wait_writable(sock)
