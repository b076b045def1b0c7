"""The `meshserve` CLI against a real supervisor process: status (table and
JSON), restart, scale, refusals, a second `up` on a live run dir, `down`, children
dying with a SIGKILLed supervisor, and a stale run dir taken over.

The supervisor is the real one (``run_foreground``, the same code `meshserve up`
runs) started in its own process group; its children are stand-ins that speak
the real hello protocol without loading a model, so these tests do not need the
whole mesh (tests/e2e covers that).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.supervisor.launcher import _read_line
from services.supervisor.run_dir import wait_for_exit

SUPERVISOR = r"""
import os, sys
from services.supervisor.launcher import run_foreground
from services.supervisor.mesh_plan import Flags, resolve_settings

STAND_IN = '''
import sys, anyio
from shared.service import serve

async def main(runtime):
    runtime.ready = True
    await anyio.sleep_forever()

serve(sys.argv[1], main)
'''

run_dir, port, ready_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
flags = Flags(run_dir=run_dir, port=port, model="/nonexistent", settings=["heartbeat_s=0.2"])
settings = resolve_settings(flags, os.environ)
sys.exit(run_foreground(
    settings, ready_fd=ready_fd, command=lambda s: [sys.executable, "-c", STAND_IN, s]
))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SupervisorProcess:
    def __init__(self, run_dir: Path, log: Path) -> None:
        self.run_dir = run_dir
        self.port = free_port()
        read_end, write_end = os.pipe()
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SUPERVISOR, str(run_dir), str(self.port), str(write_end)],
                pass_fds=(write_end,),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        os.close(write_end)
        try:
            self.ready_line = _read_line(read_end, 60.0)
        finally:
            os.close(read_end)
        self.log = log

    def stop(self) -> None:
        """Always ends the supervisor's group; its children die with it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def supervisor(ipc_dir: Path, tmp_path: Path) -> Iterator[SupervisorProcess]:
    process = SupervisorProcess(ipc_dir, tmp_path / "supervisor.log")
    try:
        assert process.ready_line == f"ready http://127.0.0.1:{process.port}", (
            process.ready_line,
            process.log.read_text()[-3000:],
        )
        yield process
    finally:
        process.stop()


def meshserve(run_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHSERVE_RUN_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "services.supervisor", *args, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def status(run_dir: Path) -> dict:
    done = meshserve(run_dir, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def pids(state: dict, service: str) -> list[int]:
    return [c["pid"] for c in state["children"] if c["service"] == service]


def test_status_restart_scale_and_down(supervisor: SupervisorProcess) -> None:
    run_dir = supervisor.run_dir
    state = status(run_dir)
    assert state["healthy"] and state["supervisor_pid"] == supervisor.process.pid
    assert state["api_url"] == f"http://127.0.0.1:{supervisor.port}"
    assert [(c["service"], c["replica"]) for c in state["children"]] == [
        ("kvcache", 0), ("scheduler", 0), ("api", 0), ("tokenizer", 0), ("worker", 0),
        ("tts", 0),
    ]
    for child in state["children"]:
        assert child["pid"] > 0 and child["healthy"] and child["state"] == "running"
        assert set(child) == {
            "service", "replica", "pid", "state", "healthy", "restarts", "uptime_s"
        }
    assert state["zygote"] is None  # stand-in commands are not forked by a zygote

    table = meshserve(run_dir, "status")
    assert table.returncode == 0 and "mesh healthy" in table.stdout
    assert "SERVICE" in table.stdout and "worker" in table.stdout

    old_worker = pids(state, "worker")
    done = meshserve(run_dir, "restart", "worker")
    assert done.returncode == 0, done.stderr
    assert "restarted worker/0" in done.stdout
    after = status(run_dir)
    assert pids(after, "worker") != old_worker and after["healthy"]

    done = meshserve(run_dir, "scale", "tokenizer=3")
    assert done.returncode == 0, done.stderr
    tokenizers = [c for c in status(run_dir)["children"] if c["service"] == "tokenizer"]
    assert [c["replica"] for c in tokenizers] == [0, 1, 2]
    assert all(c["healthy"] for c in tokenizers)

    refused = meshserve(run_dir, "scale", "scheduler=2")
    assert refused.returncode == 1 and "singleton" in refused.stderr
    refused = meshserve(run_dir, "restart", "nothing")
    assert refused.returncode == 1 and "no child nothing" in refused.stderr

    second = meshserve(run_dir, "up", "--port", str(free_port()))
    assert second.returncode == 1 and "already running" in second.stderr

    all_pids = [c["pid"] for c in status(run_dir)["children"]]
    done = meshserve(run_dir, "down")
    assert done.returncode == 0, done.stderr
    assert supervisor.process.wait(10) == 0
    for pid in all_pids:
        assert wait_for_exit(pid, 10)
    # Sockets and pid file are gone; the mesh's CURVE keys stay for the next `up`.
    assert sorted(p.name for p in run_dir.iterdir()) == ["keys"]

    gone = meshserve(run_dir, "status")
    assert gone.returncode == 1 and "no mesh is running" in gone.stderr


def test_children_die_with_a_killed_supervisor_and_the_run_dir_is_reused(
    supervisor: SupervisorProcess, tmp_path: Path
) -> None:
    run_dir = supervisor.run_dir
    children = [c["pid"] for c in status(run_dir)["children"]]
    os.kill(supervisor.process.pid, signal.SIGKILL)
    supervisor.process.wait(10)
    for pid in children:
        assert wait_for_exit(pid, 10), f"child {pid} outlived its supervisor"

    # The dead supervisor left its pid file and sockets: a stale run dir.
    assert (run_dir / "supervisor.pid").exists() and (run_dir / "control.sock").exists()
    assert meshserve(run_dir, "status").returncode == 1
    second = SupervisorProcess(run_dir, tmp_path / "second.log")
    try:
        assert second.ready_line is not None and second.ready_line.startswith("ready "), (
            second.log.read_text()[-3000:]
        )
        assert status(run_dir)["supervisor_pid"] == second.process.pid
        assert "cleaned a stale run dir" in second.log.read_text()
    finally:
        second.stop()
    assert second.process.returncode == 0
    assert not (run_dir / "supervisor.pid").exists()


def test_config_prints_every_service_with_env_and_flags_applied(ipc_dir: Path) -> None:
    env = {**os.environ, "MESHSERVE_MAX_NUM_SEQS": "7"}
    done = subprocess.run(
        [sys.executable, "-m", "services.supervisor", "config", "--json", "--run-dir",
         str(ipc_dir), "--port", "9123", "--device", "cpu", "--set", "block_size=32"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert set(config) == {
        "process", "addresses", "supervisor", "api", "tokenizer", "scheduler", "kvcache",
        "worker", "tts",
    }
    assert config["api"]["port"] == 9123 and config["worker"]["device"] == "cpu"
    assert config["scheduler"]["max_num_seqs"] == 7
    # The worker's block_size is the only one; the KV manager learns it from the pool.
    assert config["worker"]["block_size"] == 32 and "block_size" not in config["kvcache"]
    assert config["addresses"]["scheduler_addr"] == f"ipc://{ipc_dir}/scheduler.sock"
    assert config["api"]["model"] == config["worker"]["model"] != ""

    text = subprocess.run(
        [sys.executable, "-m", "services.supervisor", "config", "--run-dir", str(ipc_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert text.returncode == 0 and "[scheduler]" in text.stdout
    assert "max_num_batched_tokens = 2048  # MESHSERVE_MAX_NUM_BATCHED_TOKENS" in text.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "services.supervisor", "config", "--set", "max_num_seqs=lots"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert bad.returncode == 1 and "max_num_seqs" in bad.stderr
