"""`meshserve up`: run a supervisor in this process, or detached in the background.

Foreground: this process becomes the supervisor; Ctrl-C or SIGTERM stops the mesh
in order and the exit code says how it ended (0 stopped on request, 1 gave up).

Detached: a new session runs ``python -m services.supervisor up ...`` with its
output appended to the run dir's ``mesh.log``, and tells this process through a
pipe when the mesh is healthy (``ready <api url>``) or why it is not (``failed
<reason>``). The pipe is an event: no polling, and a supervisor that dies closes
it, which reads as a failure at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import anyio

from services.supervisor.mesh_plan import MeshSettings
from services.supervisor.process import service_command
from services.supervisor.run_dir import (
    MeshAlreadyRunning,
    RunDirLock,
    kill_and_wait,
    log_file,
    prepare,
    running_pid,
)
from services.supervisor.service import Supervisor
from services.worker.config import WorkerConfig
from shared.config import load_config
from shared.curve import CurveKeyError, ensure_keys
from shared.logs import configure_logging, get_logger
from shared.model_source import is_hub_id, resolve_hub_model
from shared.telemetry import configure_telemetry, shutdown_telemetry

log = get_logger("meshserve.supervisor")

# What a detached `up` waits beyond the startup deadline: generating the embedded
# model on a fresh machine and stopping a mesh that failed.
DETACH_SLACK_S = 120.0
LOG_TAIL_LINES = 30


class ReadyPipe:
    """The supervisor's end of the detach pipe; reports exactly once."""

    def __init__(self, fd: int) -> None:
        # Children must not hold it open, or the CLI would not see our death.
        os.set_inheritable(fd, False)
        self._fd: int | None = fd

    def __call__(self, ok: bool, message: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        line = f"{'ready' if ok else 'failed'} {' '.join(message.split())}\n"
        try:
            os.write(fd, line.encode())
        except BrokenPipeError:
            log.warning("the detaching CLI left before the mesh was ready")
        finally:
            os.close(fd)


def port_problem(host: str, port: int) -> str | None:
    """Why the api could not listen on host:port, found before starting anything."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # uvicorn sets SO_REUSEADDR too: a port in TIME_WAIT is not "in use".
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return f"the api cannot listen on {host}:{port} ({e.strerror}); pass another --port"
    return None


def pin_model(settings: MeshSettings) -> MeshSettings:
    """Generate the embedded model once, here, so children never race to do it."""
    if not settings.model:
        # Imported only when needed: it pulls in torch, which the supervisor
        # otherwise never uses (and would carry in memory for the mesh's life).
        from shared.embedded_model import SERVED_NAME, ensure_embedded_model

        return settings.with_model(ensure_embedded_model(), SERVED_NAME)
    if is_hub_id(settings.model):
        # Resolved once here (the hub cache; a download only if it is missing and
        # the hub is not offline), so every child loads the same snapshot folder
        # and the hub id stays the served name.
        revision = load_config(WorkerConfig, environ=settings.child_env("worker", 0)).revision
        return settings.with_model(resolve_hub_model(settings.model, revision), settings.model)
    if not (Path(settings.model) / "config.json").is_file():
        # Not fatal here: the services own model loading and say precisely what
        # is wrong; the restart intensity then stops the mesh.
        log.warning("model folder has no config.json; services will fail", model=settings.model)
    return settings


def run_foreground(
    settings: MeshSettings,
    *,
    ready_fd: int | None = None,
    command: Callable[[str], list[str]] = service_command,
) -> int:
    """Be the supervisor until the mesh stops; returns the process exit code.
    ``command`` says how each service's process is started."""
    configure_logging("supervisor", 0, settings.process.log_level)
    configure_telemetry("supervisor", 0)
    notify = ReadyPipe(ready_fd) if ready_fd is not None else None
    lock = RunDirLock(settings.run_dir)
    try:
        try:
            stale = lock.acquire()
        except MeshAlreadyRunning as e:
            return _refuse(str(e), notify)
        if stale:
            log.info("cleaned a stale run dir", removed=[str(p) for p in stale])
        if problem := port_problem(settings.api.host, settings.api.port):
            return _refuse(problem, notify)
        try:
            # Before anything starts, so a key dir we cannot write is one clear line.
            ensure_keys(Path(settings.process.curve_dir))
        except (CurveKeyError, OSError) as e:
            return _refuse(f"mesh keys: {e}", notify)
        try:
            settings = pin_model(settings)
        except FileNotFoundError as e:  # a hub id that is not in the cache (offline)
            return _refuse(str(e), notify)
        supervisor = Supervisor(settings, command=command, on_ready=notify)
        try:
            code = anyio.run(supervisor.run, backend="asyncio")
        except KeyboardInterrupt:
            # Ctrl-C before the signal handlers were installed: nothing started yet,
            # or the children die with us (PDEATHSIG).
            return 130
        except BaseExceptionGroup as group:
            # A socket of the run dir could not be bound: say which and why.
            unbound = group.subgroup(OSError)
            if unbound is None:
                raise
            return _refuse("; ".join(str(e) for e in _leaves(unbound)), notify)
        if code != 0:
            # The JSON log said it already; a person at the terminal reads this line.
            print(f"meshserve: {supervisor.stop_reason}", file=sys.stderr)
        return code
    finally:
        lock.release()
        shutdown_telemetry()


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for e in group.exceptions:
        leaves.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return leaves


def _refuse(reason: str, notify: ReadyPipe | None) -> int:
    log.error("refusing to start", reason=reason)
    print(f"meshserve: {reason}", file=sys.stderr)
    if notify is not None:
        notify(False, reason)
    return 1


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with path.open(errors="replace") as f:
            return list(deque(f, maxlen=lines))
    except FileNotFoundError:
        return []


def _read_line(fd: int, timeout_s: float) -> str | None:
    """One line from ``fd``; "" on EOF, None on timeout."""
    buffer = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return buffer.decode(errors="replace")
        buffer += chunk
    return buffer.split(b"\n", 1)[0].decode(errors="replace")


def run_detached(settings: MeshSettings, up_args: list[str]) -> int:
    """Start a supervisor in the background; return once the mesh is healthy."""
    run_dir = settings.run_dir
    if (pid := running_pid(run_dir)) is not None:
        print(f"meshserve: {MeshAlreadyRunning(run_dir, pid)}", file=sys.stderr)
        return 1
    prepare(run_dir)
    log_path = log_file(run_dir)
    read_end, write_end = os.pipe()
    with log_path.open("ab") as log_out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "services.supervisor", "up", *up_args,
             "--ready-fd", str(write_end)],
            stdin=subprocess.DEVNULL,
            stdout=log_out,
            stderr=subprocess.STDOUT,
            pass_fds=(write_end,),
            # Its own session: the terminal's Ctrl-C and hang-up no longer reach it.
            start_new_session=True,
        )
    os.close(write_end)
    try:
        timeout_s = settings.supervisor.startup_timeout_s + DETACH_SLACK_S
        line = _read_line(read_end, timeout_s)
    finally:
        os.close(read_end)
    if line is not None and line.startswith("ready "):
        # Detached on purpose: this process leaves the supervisor running.
        supervisor.returncode = 0
        print(line.removeprefix("ready "))
        return 0
    if line is None:
        reason = f"the mesh did not report healthy within {timeout_s:g} s"
        kill_and_wait(supervisor.pid, settings.supervisor.stop_timeout_s * 6)
    else:
        reason = line.removeprefix("failed ") or "the supervisor exited without a word"
        with contextlib.suppress(subprocess.TimeoutExpired):
            supervisor.wait(settings.supervisor.stop_timeout_s * 6 + 10)
        if supervisor.poll() is None:
            kill_and_wait(supervisor.pid, settings.supervisor.stop_timeout_s)
    supervisor.wait()
    print(f"meshserve: {reason}", file=sys.stderr)
    print(f"--- last lines of {log_path} ---", file=sys.stderr)
    for text in tail(log_path):
        print(text.rstrip("\n"), file=sys.stderr)
    return 1
