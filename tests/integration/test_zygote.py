"""The supervisor's zygote over real processes: a child forked through it is what
``spawn_child`` would have started (own group, exact environment, stdin from
/dev/null, ``__main__``, normal exit), its exit code and signals travel right, it
dies with the supervisor (SIGKILL included), a garbage request does not end the
zygote, and without a zygote (dead, or failing to start) forks fall back at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from services.supervisor.run_dir import wait_for_exit
from services.supervisor.zygote_client import ForkedProcess, ZygoteClient
from shared.child_process import RestartWindow
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

ROOT = Path(__file__).resolve().parents[2]
PROBE = "tests.integration.zygote_probe"
# A light preload keeps these tests fast; test_supervisor_zygote checks the real one.
PRELOAD = ("json", "msgspec")
DEADLINE_S = 60.0


def probe_argv(report: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", PROBE, str(report), *args]


def read_report(path: Path) -> dict[str, object]:
    deadline = time.monotonic() + DEADLINE_S
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"the probe never wrote {path}"
        time.sleep(0.05)
    facts: dict[str, object] = json.loads(path.read_text())
    return facts


@asynccontextmanager
async def zygote_client(**kwargs: object) -> AsyncIterator[ZygoteClient]:
    kwargs.setdefault("forked_modules", frozenset({PROBE}))
    client = ZygoteClient(os.environ, **kwargs)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(client.run)
        try:
            yield client
        finally:
            tg.cancel_scope.cancel()


async def fork(client: ZygoteClient, argv: list[str], env: dict[str, str]) -> ForkedProcess:
    with anyio.fail_after(DEADLINE_S):
        process = await client.fork(argv, env)
    assert process is not None, "the zygote did not fork"
    return process


@pytest.mark.anyio
async def test_a_forked_child_is_started_like_a_spawned_one(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "ONLY_IN_CHILD": "yes"}
    async with zygote_client(preload=PRELOAD) as client:
        report = tmp_path / "child.json"
        process = await fork(client, probe_argv(report, "exit", "7"), env)
        with anyio.fail_after(DEADLINE_S):
            assert await process.wait() == 7
        facts = read_report(report)
        assert facts["name"] == "__main__"
        assert facts["pid"] == process.pid
        # Its own process group and session stays the supervisor's (as spawn_child).
        assert facts["pgid"] == process.pid
        assert facts["sid"] == os.getsid(0)
        assert facts["ppid"] == client.pid  # the zygote reaps it
        assert facts["argv"] == [str(report), "exit", "7"]
        assert facts["env"] == env  # exactly the requested environment, nothing inherited
        assert facts["stdin"] == "/dev/null"
        assert facts["cwd"] == os.getcwd()
        # sys.exit went through the normal interpreter shutdown.
        assert report.with_suffix(".atexit").read_text() == "ran"


@pytest.mark.anyio
async def test_signals_reach_the_child_and_its_exit_code_comes_back(tmp_path: Path) -> None:
    async with zygote_client(preload=PRELOAD) as client:
        report = tmp_path / "child.json"
        process = await fork(client, probe_argv(report, "sleep"), dict(os.environ))
        read_report(report)
        assert process.returncode is None
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(DEADLINE_S):
            assert await process.wait() == -signal.SIGTERM
        # Once it is gone, signalling it is an error, never a signal to a recycled pid.
        with pytest.raises(ProcessLookupError):
            process.send_signal(signal.SIGKILL)


@pytest.mark.anyio
async def test_a_dead_zygote_takes_its_children_and_is_restarted(tmp_path: Path) -> None:
    async with zygote_client(preload=PRELOAD) as client:
        report = tmp_path / "child.json"
        process = await fork(client, probe_argv(report, "sleep"), dict(os.environ))
        read_report(report)
        first_zygote = client.pid
        assert first_zygote is not None
        assert client.status() == ZygoteStatus(first_zygote, "ready", 0)
        os.kill(first_zygote, signal.SIGKILL)
        with anyio.fail_after(DEADLINE_S):
            assert await process.wait() == -signal.SIGKILL
        assert wait_for_exit(process.pid, DEADLINE_S)
        # The next fork waits for the restarted zygote.
        again = tmp_path / "again.json"
        second = await fork(client, probe_argv(again, "exit", "0"), dict(os.environ))
        assert client.pid != first_zygote
        assert client.status() == ZygoteStatus(client.pid, "ready", 1)  # what `status` shows
        with anyio.fail_after(DEADLINE_S):
            assert await second.wait() == 0


@pytest.mark.anyio
async def test_a_zygote_that_cannot_start_makes_forks_fall_back_at_once() -> None:
    window = RestartWindow(max_restarts=0, period_s=60.0)
    async with zygote_client(preload=("no_such_module_anywhere",),
                             restart_window=window) as client:
        started = time.monotonic()
        with anyio.fail_after(DEADLINE_S):
            assert await client.fork(probe_argv(Path("/nonexistent"), "exit", "0"),
                                     dict(os.environ)) is None
        # Not the ready timeout (120 s): the failed start answers the waiting fork.
        assert time.monotonic() - started < 30.0
        with anyio.fail_after(DEADLINE_S):  # then the client gives up on it
            while client.status().state != "given-up":
                await anyio.sleep(0.05)
        assert client.status() == ZygoteStatus(None, "given-up", 0)


@pytest.mark.anyio
async def test_only_python_m_commands_go_through_the_zygote() -> None:
    client = ZygoteClient(os.environ)  # never started: a refusal needs no zygote
    assert await client.fork([sys.executable, "-c", "pass"], dict(os.environ)) is None
    assert await client.fork(["/bin/true", "-m", "x"], dict(os.environ)) is None


def test_a_malformed_request_is_answered_and_the_zygote_keeps_serving(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = subprocess.Popen(
        [sys.executable, "-m", "services.supervisor.zygote", "--fd", str(theirs.fileno()),
         "--preload", "json"],
        pass_fds=(theirs.fileno(),), cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        start_new_session=True,
    )
    theirs.close()
    decoder = msgspec.msgpack.Decoder(ZygoteReport)
    child_pid = None
    try:
        ours.settimeout(DEADLINE_S)
        assert isinstance(decoder.decode(ours.recv(MAX_PACKET)), ZygoteReady)
        for garbage in (b"\xff\x00garbage", msgspec.msgpack.encode({"type": "fork"})):
            ours.send(garbage)
            answer = decoder.decode(ours.recv(MAX_PACKET))
            assert isinstance(answer, ForkFailed) and answer.request_id == -1
        report = tmp_path / "child.json"
        request = ForkRequest(request_id=5, module=PROBE, args=[str(report), "exit", "3"],
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        ours.send(msgspec.msgpack.encode(request))
        data, fds, _, _ = socket.recv_fds(ours, MAX_PACKET, 1)
        forked = decoder.decode(data)
        assert isinstance(forked, Forked) and forked.request_id == 5 and len(fds) == 1
        child_pid = forked.pid
        os.close(fds[0])
        exited = decoder.decode(ours.recv(MAX_PACKET))
        assert exited == ChildExited(pid=forked.pid, returncode=3)
        # Closing our end is how the supervisor stops it.
        ours.close()
        assert zygote.wait(timeout=DEADLINE_S) == 0
    finally:
        ours.close()
        if zygote.poll() is None:
            zygote.kill()
            zygote.wait()
        if child_pid is not None:
            assert wait_for_exit(child_pid, DEADLINE_S)


SUPERVISOR = r"""
import anyio, os, sys
from services.supervisor.zygote_client import ZygoteClient

async def main():
    client = ZygoteClient(os.environ, preload=("json",),
                          forked_modules=frozenset({"tests.integration.zygote_probe"}))
    async with anyio.create_task_group() as tg:
        await tg.start(client.run)
        process = await client.fork(
            [sys.executable, "-m", "tests.integration.zygote_probe", sys.argv[1], "sleep"],
            dict(os.environ))
        print("pids", client.pid, process.pid, flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


def test_a_forked_child_dies_with_the_supervisor_even_on_sigkill(tmp_path: Path) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path / "child.json")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert supervisor.stdout is not None
        # Its log lines share stdout: the pids are the line that starts with "pids".
        line = next(line for line in supervisor.stdout if line.startswith("pids "))
        zygote_pid, child_pid = (int(pid) for pid in line.split()[1:])
        read_report(tmp_path / "child.json")
        assert os.getpgid(child_pid) == child_pid
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        assert wait_for_exit(zygote_pid, DEADLINE_S), "the zygote outlived the supervisor"
        assert wait_for_exit(child_pid, DEADLINE_S), "the child outlived the supervisor"
    finally:
        supervisor.kill()
        supervisor.wait()
