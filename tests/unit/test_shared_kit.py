"""The actor kit in shared/: recent ids, choice ids and seeds, endpoint factories
over real ipc sockets, and child processes that die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import zmq.asyncio

from services.supervisor.run_dir import wait_for_exit
from shared.config import MeshAddresses, ProcessConfig
from shared.endpoints import bind_router, connect_dealer
from shared.mesh import Identity, PeerJoined, Received, UpstreamJoined
from shared.protocol.choices import choice_id, choice_ids, choice_sampling, choice_seed
from shared.protocol.generation import Abort, SamplingParams
from shared.recent_ids import RecentIds
from shared.service import ServiceRuntime

ROOT = Path(__file__).resolve().parents[2]


def test_recent_ids_forget_the_oldest_first() -> None:
    recent: RecentIds[str] = RecentIds(3)
    for request_id in "abcd":
        recent.add(request_id)
    assert "a" not in recent and all(i in recent for i in "bcd") and len(recent) == 3


def test_recent_ids_re_adding_makes_an_id_the_newest() -> None:
    recent: RecentIds[str] = RecentIds(3)
    for request_id in "abc":
        recent.add(request_id)
    recent.add("a")
    recent.add("d")
    assert "b" not in recent and "a" in recent


def test_recent_ids_discard_says_whether_it_knew_the_id() -> None:
    recent: RecentIds[str] = RecentIds(2)
    recent.add("a")
    assert recent.discard("a") is True
    assert recent.discard("a") is False and "a" not in recent


def test_choices_of_one_request() -> None:
    assert choice_ids("chatcmpl-1", 1) == ["chatcmpl-1"]
    assert choice_ids("chatcmpl-1", 3) == ["chatcmpl-1-0", "chatcmpl-1-1", "chatcmpl-1-2"]
    assert choice_id("r", 2) == "r-2"
    assert [choice_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert choice_seed(None, 2) is None
    seeded = SamplingParams(max_tokens=4, seed=7)
    assert choice_sampling(seeded, 0) is seeded
    assert choice_sampling(seeded, 2).seed == 9
    unseeded = SamplingParams(max_tokens=4)
    assert choice_sampling(unseeded, 2) is unseeded


@pytest.mark.anyio
async def test_factories_wire_identity_heartbeat_and_the_runtime_hello(ipc_dir: Path) -> None:
    ctx = zmq.asyncio.Context()
    addresses = MeshAddresses(scheduler_addr=f"ipc://{ipc_dir}/scheduler.sock")
    process = ProcessConfig(heartbeat_s=0.05)
    singleton = ServiceRuntime(Identity("scheduler", 0), process, addresses, ctx)
    replica = ServiceRuntime(Identity("tokenizer", 2), process, addresses, ctx, capacity=7)
    router = bind_router(singleton, addresses.scheduler_addr, Abort)
    dealer = connect_dealer(replica, addresses.scheduler_addr, Abort)
    assert router.heartbeat_s == dealer.heartbeat_s == 0.05
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(router.run)
            await tg.start(dealer.run)
            with anyio.fail_after(5):
                joined = await anext(e async for e in router.inbox if isinstance(e, PeerJoined))
                assert joined.peer.name == "tokenizer/2"
                assert (joined.peer.hello.ready, joined.peer.hello.capacity) == (False, 7)
                up = await anext(e async for e in dealer.inbox if isinstance(e, UpstreamJoined))
                assert up.welcome.service == "scheduler"
                # The hello is built from the runtime at each beat: readiness set
                # later reaches the singleton without rebuilding the endpoint.
                replica.ready = True
                await dealer.say_hello()
                # One socket keeps order: once this arrives, so has the hello.
                await dealer.send(Abort(request_ids=["after-hello"]))
                got = await anext(e async for e in router.inbox if isinstance(e, Received))
                assert got.peer is not None and got.peer.hello.ready
            tg.cancel_scope.cancel()
    finally:
        router.close()
        dealer.close()
        ctx.destroy(linger=0)


PARENT = r"""
import asyncio, os, sys
from shared.child_process import spawn_child

async def main():
    child = await spawn_child([sys.executable, "-c", "import time; time.sleep(60)"], os.environ)
    print(child.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_a_spawned_child_dies_with_its_parent_even_on_sigkill() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        # Its own process group: a terminal's Ctrl-C reaches only the parent.
        assert os.getpgid(child_pid) == child_pid
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_for_exit(child_pid, 10.0), "the child outlived its parent"
    finally:
        parent.kill()
        parent.wait()
