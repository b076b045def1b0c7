"""A whole mesh for tests: `meshserve up` in the foreground, as a user runs it.

    mesh = start_mesh(tmp_path, extra_args=("--tokenizers", "2"))
    try:
        httpx.post(mesh.base_url + "/v1/completions", json=...)
        mesh.cli("restart", "worker")     # any meshserve command, on this mesh's run dir
        mesh.status()                     # parsed `meshserve status --json`
    finally:
        mesh.stop()                       # always ends the supervisor's process group

The supervisor runs in a new process group with a short run dir under /tmp (ipc
paths are limited to ~107 bytes, pytest's tmp_path is too long) and a free port.
Its output goes to ``<tmp_path>/mesh.log``; failures quote the end of it.
Readiness is polled (``/health`` and ``status --json``) with a deadline: no event
crosses the process boundary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from services.supervisor.run_dir import kill_and_wait, running_pid, wait_for_exit

# Cold start on a busy 2-core machine (imports, model load) stays well under this.
STARTUP_DEADLINE_S = 240.0
STOP_DEADLINE_S = 60.0
CLI_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def short_run_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))


def mesh_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment for a mesh under test: ours plus ``env``; the run
    dir and port always come from flags."""
    merged = {k: v for k, v in os.environ.items() if k != "MESHSERVE_RUN_DIR"}
    merged.update(env or {})
    merged.setdefault("PYTHONUNBUFFERED", "1")
    return merged


def meshserve(
    run_dir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run one `meshserve` command (``python -m services.supervisor``) on ``run_dir``."""
    return subprocess.run(
        [sys.executable, "-m", "services.supervisor", *args, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=mesh_env(env),
        check=False,
    )


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except FileNotFoundError:
        return "(no log)"


def kill_detached(run_dir: Path) -> None:
    """End a detached mesh whatever its state (its children die with it)."""
    pid = running_pid(run_dir)
    if pid is not None:
        kill_and_wait(pid, STOP_DEADLINE_S)


class Mesh:
    """A running mesh started by ``start_mesh``."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        run_dir: Path,
        port: int,
        log_path: Path,
        env: Mapping[str, str] | None,
    ) -> None:
        self.process = process
        self.run_dir = run_dir
        self.port = port
        self.log_path = log_path
        self.env = dict(env or {})
        self.base_url = f"http://127.0.0.1:{port}"
        # Every child pid ever seen: stop() makes sure none survives.
        self._child_pids: set[int] = set()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return meshserve(self.run_dir, *args, env=self.env, timeout=timeout)

    def status(self) -> dict[str, Any]:
        """`meshserve status --json`, parsed; raises with stderr if it failed."""
        done = self.cli("status", "--json", timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"meshserve status failed: {done.stderr.strip()}\n{self.logs()}")
        state: dict[str, Any] = json.loads(done.stdout)
        self._child_pids.update(c["pid"] for c in state["children"] if c["pid"])
        return state

    def children(self, service: str) -> list[dict[str, Any]]:
        return [c for c in self.status()["children"] if c["service"] == service]

    def logs(self, lines: int = 60) -> str:
        return f"--- last lines of {self.log_path} ---\n{log_tail(self.log_path, lines)}"

    def health(self) -> int | None:
        try:
            return httpx.get(self.base_url + "/health", timeout=5).status_code
        except httpx.TransportError:
            return None

    def wait_healthy(self, deadline_s: float = STARTUP_DEADLINE_S) -> dict[str, Any]:
        """Until /health answers 200 and the supervisor sees every child healthy;
        returns that status. Fails at once if the supervisor exits."""
        deadline = time.monotonic() + deadline_s
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"meshserve up exited with {code}\n{self.logs()}")
            if self.health() == 200:
                last = self.status()
                if last["healthy"]:
                    return last
            time.sleep(0.2)  # polling with a deadline: no cross-process event exists
        raise TimeoutError(
            f"mesh not healthy within {deadline_s:g} s; last status {last}\n{self.logs()}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the supervisor (it stops its children in order); SIGKILL the group
        after a deadline. Idempotent; returns the supervisor's exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Children die with the supervisor (PDEATHSIG); make sure of it anyway.
        for pid in self._child_pids:
            if not wait_for_exit(pid, 10.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._child_pids.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.process.returncode


def start_mesh(
    tmp_path: Path,
    *,
    extra_args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    deadline_s: float = STARTUP_DEADLINE_S,
) -> Mesh:
    """Start `meshserve up` in the foreground and return once it is healthy."""
    run_dir = short_run_dir()
    port = free_port()
    log_path = tmp_path / "mesh.log"
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "services.supervisor", "up",
                "--run-dir", str(run_dir), "--port", str(port), *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=mesh_env(env),
            start_new_session=True,
        )
    mesh = Mesh(process, run_dir, port, log_path, env)
    try:
        mesh.wait_healthy(deadline_s)
    except BaseException:
        mesh.stop()
        raise
    return mesh
