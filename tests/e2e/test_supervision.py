"""Supervision of the whole mesh, real processes end to end: status, restart,
scale, kill -9 of every kind of child, giving up when a service cannot start,
Ctrl-C, and `meshserve down` of a detached mesh."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from services.supervisor.run_dir import running_pid, wait_for_exit
from tests.e2e.mesh import (
    Mesh,
    free_port,
    kill_detached,
    log_tail,
    mesh_env,
    meshserve,
    short_run_dir,
)

pytestmark = pytest.mark.slow

SERVICES = ("kvcache", "scheduler", "api", "tokenizer", "worker", "tts")


def complete(mesh: Mesh) -> None:
    """One plain HTTP completion; the mesh must answer it in full."""
    reply = httpx.post(
        mesh.base_url + "/v1/completions",
        json={"model": "meshserve-tiny-llama", "prompt": "The mesh", "max_tokens": 4,
              "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200, (reply.text, mesh.logs())
    body = reply.json()
    assert body["usage"]["completion_tokens"] >= 1
    assert body["choices"][0]["finish_reason"] in ("length", "stop")


def test_status_lists_every_child(mesh: Mesh) -> None:
    state = mesh.status()
    assert state["healthy"] and state["api_url"] == mesh.base_url
    assert [c["service"] for c in state["children"]] == list(SERVICES)
    for child in state["children"]:
        assert child["replica"] == 0 and child["pid"] > 0
        assert child["healthy"] and child["state"] == "running"
    table = mesh.cli("status")
    assert table.returncode == 0 and "mesh healthy" in table.stdout


def test_restart_worker(mesh: Mesh) -> None:
    (before,) = mesh.children("worker")
    done = mesh.cli("restart", "worker")
    assert done.returncode == 0, (done.stderr, mesh.logs())
    (after,) = mesh.children("worker")
    assert after["pid"] != before["pid"] and after["healthy"]
    assert wait_for_exit(before["pid"], 10)
    mesh.wait_healthy()
    complete(mesh)


def test_scale_tokenizers_to_three_and_back(mesh: Mesh) -> None:
    done = mesh.cli("scale", "tokenizer=3")
    assert done.returncode == 0, (done.stderr, mesh.logs())
    tokenizers = mesh.children("tokenizer")
    assert [c["replica"] for c in tokenizers] == [0, 1, 2]
    assert all(c["healthy"] and c["pid"] for c in tokenizers)
    mesh.wait_healthy()
    complete(mesh)
    refused = mesh.cli("scale", "api=2")
    assert refused.returncode == 1 and "singleton" in refused.stderr
    done = mesh.cli("scale", "tokenizer=1")
    assert done.returncode == 0, done.stderr
    assert [c["replica"] for c in mesh.children("tokenizer")] == [0]
    for gone in tokenizers[1:]:
        assert wait_for_exit(gone["pid"], 10)


@pytest.mark.parametrize("service", SERVICES)
def test_kill_9_of_an_idle_child_is_repaired(mesh: Mesh, service: str) -> None:
    (before,) = mesh.children(service)
    os.kill(before["pid"], signal.SIGKILL)
    assert wait_for_exit(before["pid"], 10)
    state = mesh.wait_healthy()
    (after,) = [c for c in state["children"] if c["service"] == service]
    assert after["pid"] != before["pid"]
    assert after["restarts"] == before["restarts"] + 1
    complete(mesh)


def test_ctrl_c_stops_the_mesh_cleanly(mesh: Mesh) -> None:
    pids = [c["pid"] for c in mesh.status()["children"]]
    assert mesh.stop(signal.SIGINT) == 0, mesh.logs()
    for pid in pids:
        assert wait_for_exit(pid, 10)
    assert "mesh stopped" in log_tail(mesh.log_path, 5)


def test_restart_intensity_exceeded_gives_up(tmp_path: Path) -> None:
    run_dir = short_run_dir()
    log_path = tmp_path / "mesh.log"
    # A real failure: no model folder, so the services that load it cannot start.
    # A long window makes "more than 5 restarts" certain however slow the machine.
    args = ["up", "--run-dir", str(run_dir), "--port", str(free_port()),
            "--model", "/nonexistent", "--set", "restart_period_s=600"]
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.supervisor", *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=mesh_env(), start_new_session=True,
        )
    try:
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert code == 1, log_tail(log_path)
    (gave_up, *_) = [json.loads(line) for line in log.splitlines() if '"giving up"' in line]
    assert gave_up["service"] == "supervisor" and gave_up["level"] == "error"
    assert gave_up["failed_service"] in ("api", "tokenizer", "worker")
    assert f"{gave_up['failed_service']} restarted more than 5 times" in gave_up["reason"]
    assert '"event": "mesh stopped"' in log
    assert not any(path.suffix in (".sock", ".pid") for path in run_dir.iterdir())
    shutil.rmtree(run_dir)  # the mesh's keys stay after it stopped


def test_detach_that_cannot_become_healthy_fails_with_the_reason_and_the_log() -> None:
    run_dir = short_run_dir()
    try:
        up = meshserve(
            run_dir, "up", "--detach", "--port", str(free_port()), "--model", "/nonexistent",
            "--set", "restart_intensity=1", "--set", "restart_period_s=600",
        )
        assert up.returncode == 1, up
        assert "restarted more than 1 times" in up.stderr
        assert "last lines of" in up.stderr and '"event": "mesh stopped"' in up.stderr
        assert running_pid(run_dir) is None
        # The mesh's CURVE keys stay for the next `up`.
        assert sorted(p.name for p in run_dir.iterdir()) == ["keys", "mesh.log"]
    finally:
        kill_detached(run_dir)
        shutil.rmtree(run_dir)


def test_down_stops_a_detached_mesh_without_leftovers() -> None:
    run_dir = short_run_dir()
    port = free_port()
    try:
        up = meshserve(run_dir, "up", "--detach", "--port", str(port))
        log = run_dir / "mesh.log"
        assert up.returncode == 0, (up.stderr, log_tail(log))
        assert up.stdout.strip() == f"http://127.0.0.1:{port}"
        assert httpx.get(up.stdout.strip() + "/health", timeout=10).status_code == 200
        supervisor = running_pid(run_dir)
        assert supervisor is not None
        status = meshserve(run_dir, "status", "--json")
        assert status.returncode == 0, status.stderr
        pids = [c["pid"] for c in json.loads(status.stdout)["children"]]

        again = meshserve(run_dir, "up", "--detach", "--port", str(free_port()))
        assert again.returncode == 1 and "already running" in again.stderr

        down = meshserve(run_dir, "down")
        assert down.returncode == 0, (down.stderr, log_tail(log))
        for pid in [supervisor, *pids]:
            assert wait_for_exit(pid, 1), f"pid {pid} still alive after down"
        leftovers = sorted(p.name for p in run_dir.iterdir())
        assert leftovers == ["keys", "mesh.log"], leftovers
        assert meshserve(run_dir, "status").returncode == 1
    finally:
        kill_detached(run_dir)
        shutil.rmtree(run_dir)
