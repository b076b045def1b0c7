"""Child processes that cannot outlive their parent, and the restart window that
stops a crash loop: the one primitive the supervisor (service processes) and a tts
replica (engine processes) both start their children with.

Each child gets ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: if the parent dies in any
way, SIGKILL included, the kernel kills the child, so no orphan keeps a GPU, a
port or an audio engine. Each child also gets its own process group, so a Ctrl-C
on the terminal reaches only the parent, which then stops its children in order
instead of all of them dying at once.

PDEATHSIG fires when the *thread* that forked the child exits; children are
spawned from the event loop's thread, which lives as long as the parent.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Protocol

PR_SET_PDEATHSIG = 1

# Resolved before any fork: the pre-exec hook runs between fork and exec, where
# loading a library (taking locks another thread might hold) could deadlock.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def _die_with(parent_pid: int) -> Callable[[], None]:
    def pre_exec() -> None:
        if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(125)
        # The parent may have died between fork and prctl; then no signal comes.
        if os.getppid() != parent_pid:
            os._exit(125)

    return pre_exec


class ChildProcess(Protocol):
    """What owners of a child use: ``asyncio.subprocess.Process`` and the
    supervisor's zygote-forked processes both are one."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, signum: int) -> None: ...


async def spawn_child(
    argv: list[str],
    env: Mapping[str, str],
    *,
    cwd: Path | None = None,
    pass_fds: Collection[int] = (),
) -> asyncio.subprocess.Process:
    """Start one child: inherited stdout/stderr, no stdin, own process group,
    killed by the kernel if this process dies; ``pass_fds`` stay open in it."""
    return await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        pass_fds=tuple(pass_fds),
        # The hook makes one syscall through a pre-resolved function: no imports,
        # no allocation-heavy work between fork and exec.
        preexec_fn=_die_with(os.getpid()),
        process_group=0,
    )


def signal_process(process: ChildProcess, signum: int) -> bool:
    """Send ``signum`` unless the process is already gone; True if sent."""
    if process.returncode is not None:
        return False
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        return False
    return True


class RestartWindow:
    """OTP's restart intensity: at most ``max_restarts`` restarts within any
    ``period_s``. Past that, restarting does not help (a bad model path, a port in
    use, an engine that cannot load) and the owner must give up loudly instead of
    flapping forever. Time is passed in, so tests need no clock."""

    def __init__(self, max_restarts: int = 5, period_s: float = 30.0) -> None:
        assert max_restarts >= 0 and period_s > 0
        self.max_restarts = max_restarts
        self.period_s = period_s
        self._restarts: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Count a restart at ``now``; False when that exceeds the intensity."""
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > self.period_s:
            self._restarts.popleft()
        return len(self._restarts) <= self.max_restarts
