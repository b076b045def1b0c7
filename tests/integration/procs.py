"""Start one real service process for a message-level test, and always end it.

Each service runs as ``python -m services.<name>`` in its own process group, with
its singleton addresses in the test's ipc dir; ``stop`` ends the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from shared.config import MeshAddresses, as_env


def mesh_addresses(ipc_dir: Path) -> MeshAddresses:
    return MeshAddresses(
        supervisor_addr="",
        api_addr=f"ipc://{ipc_dir}/api.sock",
        scheduler_addr=f"ipc://{ipc_dir}/scheduler.sock",
        kvcache_addr=f"ipc://{ipc_dir}/kvcache.sock",
        speech_addr=f"ipc://{ipc_dir}/speech.sock",
    )


def service_env(ipc_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    if "MESHSERVE_CACHE_DIR" in os.environ:
        env["MESHSERVE_CACHE_DIR"] = os.environ["MESHSERVE_CACHE_DIR"]
    env.update(as_env(mesh_addresses(ipc_dir)))
    env["MESHSERVE_HEARTBEAT_S"] = "0.1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    # Children of the service (engine processes) share its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def running_service(
    name: str, ipc_dir: Path, extra_env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = ipc_dir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env=service_env(ipc_dir, extra_env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop(proc)


def read_log(ipc_dir: Path, name: str) -> str:
    path = ipc_dir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""
