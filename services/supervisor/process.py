"""Starting child processes that cannot outlive the supervisor.

Each child gets ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: if the supervisor dies in
any way, SIGKILL included, the kernel kills its children, so no orphan keeps a
GPU or a port. Each child also gets its own process group, so a Ctrl-C on the
terminal reaches only the supervisor, which then stops the children in order
instead of all of them dying at once.

PDEATHSIG fires when the *thread* that forked the child exits; children are
spawned from the event loop's thread, which lives as long as the supervisor.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping

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


def service_command(service: str) -> list[str]:
    """How a service process is started: its package's ``__main__``."""
    return [sys.executable, "-m", f"services.{service}"]


async def spawn_child(argv: list[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
    """Start one child: inherited stdout/stderr, no stdin, own process group,
    killed by the kernel if this process dies."""
    return await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        # The hook makes one syscall through a pre-resolved function: no imports,
        # no allocation-heavy work between fork and exec.
        preexec_fn=_die_with(os.getpid()),
        process_group=0,
    )


def signal_process(process: asyncio.subprocess.Process, signum: int) -> bool:
    """Send ``signum`` unless the process is already gone; True if sent."""
    if process.returncode is not None:
        return False
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        return False
    return True
