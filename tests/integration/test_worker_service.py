"""``python -m services.worker`` as a real process, driven over its real socket.

The test binds the scheduler's ROUTER and plays the scheduler: it waits for the
worker's hello, sends StepPlans and compares every StepResult with what an
in-process ``ModelRunner`` on the same weights answers to the same plans. One
worker process serves the whole module (starting torch is the slow part); each
test binds a fresh router, which the worker sees as a restarted scheduler.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from services.worker.runner import ModelRunner
from services.worker.service import PLAN_QUEUE_SIZE
from shared.embedded_model import ensure_embedded_model
from shared.mesh import Peer, Received, RouterEndpoint
from shared.protocol.envelope import PROTOCOL_VERSION, pack_i32
from shared.protocol.generation import SamplingParams
from shared.protocol.step import NewRequest, StepBatch, StepPlan, StepResult
from tests.integration.procs import read_log
from tests.integration.worker_procs import running_worker, scheduler_router
from tests.local_engine import LocalEngine

pytestmark = pytest.mark.anyio

NUM_KV_BLOCKS = 256
BLOCK_SIZE = 16
STEP_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def worker_dir(model_dir: Path) -> Iterator[Path]:
    """A running worker process (and the folder of its socket and log)."""
    with running_worker(model_dir, NUM_KV_BLOCKS, BLOCK_SIZE, "msw-",
                        lambda _: {"MESHSERVE_REPLICA": "3"}) as path:
        yield path


@pytest.fixture(scope="module")
def local_runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(model_dir, "cpu", "float32", NUM_KV_BLOCKS, BLOCK_SIZE)


class FakeScheduler:
    """The test's side of the socket: a bound router and the worker that joined it."""

    def __init__(self, router: RouterEndpoint[StepResult], peer: Peer) -> None:
        self.router = router
        self.peer = peer

    async def send(self, plan: StepPlan) -> None:
        assert await self.router.send(self.peer, plan)

    async def result(self) -> StepResult:
        with anyio.fail_after(STEP_TIMEOUT_S):
            async for event in self.router.inbox:
                if isinstance(event, Received) and isinstance(event.body, StepResult):
                    return event.body
        raise AssertionError("router inbox closed")

    async def step(self, plan: StepPlan) -> StepResult:
        await self.send(plan)
        result = await self.result()
        assert result.step_id == plan.step_id
        return result


@asynccontextmanager
async def scheduler(worker_dir: Path) -> AsyncIterator[FakeScheduler]:
    async with scheduler_router(worker_dir, StepResult) as (router, peer):
        yield FakeScheduler(router, peer)


def plan(step_id: int, work: dict[str, int], *, new: list[NewRequest] | None = None,
         owners: list[int] | None = None, blocks: list[int] | None = None) -> StepPlan:
    """``blocks[j]`` is appended to the table of the ``owners[j]``-th request of ``work``."""
    appends: list[list[int]] = [[] for _ in work]
    for owner, block in zip(owners or [], blocks or [], strict=True):
        appends[owner].append(block)
    return StepPlan(step_id, new=new or [],
                    batch=StepBatch.pack(list(work), list(work.values()), appends))


async def test_hello_and_steps_match_the_in_process_runner(
    worker_dir: Path, local_runner: ModelRunner
) -> None:
    async with scheduler(worker_dir) as fake:
        hello = fake.peer.hello
        assert (hello.service, hello.replica, hello.capacity) == ("worker", 3, PLAN_QUEUE_SIZE)
        assert hello.worker == local_runner.details()

        local_runner.reset()
        engine = LocalEngine(local_runner, chunk_size=24, token_budget=40, block_order_seed=1)
        engine.add("greedy-long", list(range(100, 170)), SamplingParams(max_tokens=6,
                                                                        temperature=0.0))
        engine.add("greedy-short", [7], SamplingParams(max_tokens=9, temperature=0.0))
        engine.add("seeded", list(range(300, 320)), SamplingParams(max_tokens=7, temperature=1.0,
                                                                   top_k=50, seed=99))
        steps = 0
        while engine.has_work:
            step_plan = engine.next_plan()
            remote = await fake.step(step_plan)
            expected = local_runner.execute(step_plan)
            assert remote == expected
            engine.record(expected)
            steps += 1
        assert steps >= 9 and all(len(out) > 5 for out in engine.outputs.values())


async def test_plans_queue_and_run_in_arrival_order(worker_dir: Path) -> None:
    async with scheduler(worker_dir) as fake:
        greedy = SamplingParams(temperature=0.0)
        plans = [
            plan(i, {f"r{i}": 20}, new=[NewRequest(f"r{i}", pack_i32(range(i, i + 20)), 0,
                                                   greedy)],
                 owners=[0, 0], blocks=[2 * i, 2 * i + 1])
            for i in range(1, 6)
        ]
        for step_plan in plans:  # all sent before the first result comes back
            await fake.send(step_plan)
        results = [await fake.result() for _ in plans]
        assert [r.step_id for r in results] == [1, 2, 3, 4, 5]
        assert all(r.error is None and r.request_ids == [f"r{r.step_id}"] for r in results)


async def test_garbage_and_wrong_plans_are_refused_and_the_worker_keeps_serving(
    worker_dir: Path,
) -> None:
    greedy = SamplingParams(temperature=0.0)
    async with scheduler(worker_dir) as fake:
        first = await fake.step(plan(1, {"a": 3}, new=[NewRequest("a", pack_i32([1, 2, 3]), 0,
                                                                 greedy)],
                                     owners=[0], blocks=[0]))
        assert first.error is None and first.request_ids == ["a"]

        socket = fake.router.socket
        identity = fake.peer.identity
        await socket.send_multipart([identity, os.urandom(64)])
        await socket.send_multipart([identity, b"\x93\x01\x02", os.urandom(32)])
        # A valid envelope around a message of a type the worker never accepts.
        envelope = msgspec.msgpack.encode([PROTOCOL_VERSION, 7, "scheduler/0", "", ""])
        wrong_type = msgspec.msgpack.encode(StepResult(5, [], b""))
        await socket.send_multipart([identity, envelope, wrong_type])

        unknown = await fake.step(plan(2, {"ghost": 1}))
        assert unknown.error is not None and "unknown request" in unknown.error
        mismatched = StepPlan(3, batch=StepBatch(["a"], pack_i32([1, 1]), pack_i32([0])))
        reply = await fake.step(mismatched)
        assert reply.error is not None and "num_tokens" in reply.error
        short_table = await fake.step(plan(4, {"a": 1, "b": 20}, new=[
            NewRequest("b", pack_i32(range(20)), 0, greedy)], owners=[1], blocks=[5]))
        assert short_table.error is not None and "blocks" in short_table.error

        # None of that changed anything: "a" decodes, "b" is still unknown.
        good = await fake.step(plan(5, {"a": 1}))
        assert good.error is None and good.request_ids == ["a"]
        assert "unknown request" in ((await fake.step(plan(6, {"b": 1}))).error or "")
    log = read_log(worker_dir, "worker")
    rejected = [msgspec.json.decode(line) for line in log.splitlines()
                if '"message rejected"' in line]
    # The socket's own rejections (garbage) name the scheduler address; the plans the
    # runner refused are logged under "scheduler" (both rate-limited per sender).
    assert any(entry["sender"].startswith("ipc://") for entry in rejected), log[-3000:]
    assert any(entry["sender"] == "scheduler" for entry in rejected), log[-3000:]


async def test_a_restarted_scheduler_voids_the_requests_of_the_old_one(
    worker_dir: Path,
) -> None:
    greedy = SamplingParams(temperature=0.0)
    new_keep = NewRequest("keep", pack_i32([4, 5, 6]), 0, greedy)
    async with scheduler(worker_dir) as fake:
        assert (await fake.step(plan(1, {"keep": 3}, new=[new_keep], owners=[0],
                                     blocks=[0]))).request_ids == ["keep"]
        assert (await fake.step(plan(2, {"keep": 1}))).request_ids == ["keep"]
    async with scheduler(worker_dir) as fake:
        after = await fake.step(plan(1, {"keep": 1}))
        assert after.error is not None and "unknown request 'keep'" in after.error


async def test_constrained_requests_over_the_socket(
    worker_dir: Path, local_runner: ModelRunner
) -> None:
    """Structured outputs at the message level: a grammar that can only end samples
    EOS first; a request aborted mid-grammar (``finished``) frees its matcher, so
    the same id can come back with another grammar; outputs equal the in-process
    runner's, step for step."""
    from shared.grammar import choice_grammar, regex_grammar

    eos = list(local_runner.model.config.eos_token_ids)

    def constrained(grammar: str) -> SamplingParams:
        return SamplingParams(max_tokens=20, temperature=1.0, seed=3, stop_token_ids=eos,
                              grammar=grammar)

    async with scheduler(worker_dir) as fake:
        local_runner.reset()
        only_eos = NewRequest("end", pack_i32([5, 6, 7]), 0, constrained(regex_grammar("")))
        letters = NewRequest("cut", pack_i32([8, 9]), 0,
                             constrained(regex_grammar("[a-z]{40}")))
        first = plan(1, {"end": 3, "cut": 2}, new=[only_eos, letters], owners=[0, 1],
                     blocks=[1, 2])
        remote = await fake.step(first)
        assert remote == local_runner.execute(first)
        assert memoryview(remote.token_ids).cast("i")[0] in eos
        for step_id in (2, 3):
            follow = plan(step_id, {"cut": 1})
            assert await fake.step(follow) == local_runner.execute(follow)
        # Aborted mid-grammar, then back under the same id with a choice grammar.
        again = NewRequest("cut", pack_i32([8, 9]), 0, constrained(choice_grammar(["yes"])))
        restart = StepPlan(4, finished=["end", "cut"], new=[again],
                           batch=StepBatch.pack(["cut"], [2], [[3]]))
        outputs = []
        step_plan = restart
        for step_id in range(5, 12):
            result = await fake.step(step_plan)
            assert result == local_runner.execute(step_plan)
            outputs += list(memoryview(result.token_ids).cast("i"))
            if outputs and outputs[-1] in eos:
                break
            step_plan = plan(step_id, {"cut": 1})
        assert outputs[-1] in eos
        assert "end" not in local_runner.grammars and "cut" in local_runner.grammars
