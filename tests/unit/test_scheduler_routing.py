"""Per-worker queues (services/scheduler/dispatch.py): placement at submit, the
global bounds over every queue, requests waiting for a first worker, worker loss,
rebalancing, swapped requests bound to their worker; driven synchronously with the
real KvManager and one bookkeeping worker per worker, like the actor."""

from __future__ import annotations

import pytest

from services.kvcache.manager import KvManager
from services.scheduler.request import RequestStatus
from services.scheduler.scheduler import Scheduler
from shared.protocol.envelope import pack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit
from shared.protocol.step import StepResult
from tests.unit.test_scheduler_core import (
    BookkeepingWorker,
    details,
    make_scheduler,
    start,
    submit,
)
from tests.unit.test_scheduler_swap import SwappingWorker, gb_for, swap_details

W0, W1 = "worker/0", "worker/1"


def submit_tokens(s: Scheduler, rid: str, tokens: list[int], max_tokens: int = 4) -> None:
    s.submit(Submit(rid, pack_i32(tokens), SamplingParams(max_tokens=max_tokens,
                                                          temperature=0.0),
                    DetokenizeSpec()), owner="tokenizer/0")


def shared_prefix(k: int, suffix: int) -> list[int]:
    """24 tokens of prefix ``k`` (6 blocks of 4), then 3 tokens of its own."""
    return [1000 * (k + 1) + i for i in range(24)] + [10 + suffix, 11 + suffix, 12 + suffix]


def queued_on(s: Scheduler, name: str) -> list[str]:
    return [r.request_id for r in s.workers[name].waiting.requests()]


def run_workers(s: Scheduler, kv: KvManager, names: list[str],
                workers: dict[str, BookkeepingWorker] | None = None,
                max_rounds: int = 10_000) -> dict[str, list[int]]:
    """Plan -> execute -> result for every worker in turn until all are idle; the
    tokens of every finished request."""
    workers = workers or {n: BookkeepingWorker(block_size=4) for n in names}
    pending: dict[str, list[StepResult]] = {n: [] for n in names}
    produced: dict[str, list[int]] = {}
    finished: set[str] = set()
    for _ in range(max_rounds):
        busy = False
        for name in names:
            while (plan := s.plan(name)) is not None:
                pending[name].append(workers[name].execute(plan))
            sync = s.workers[name].lease.sync_message()
            if sync is not None:
                s.on_lease(kv.sync(sync))
            if pending[name]:
                s.on_result(name, pending[name].pop(0))
            busy |= bool(pending[name] or sync is not None or s.has_work(name))
        outputs, failures = s.take_outputs()
        assert not failures
        for out in outputs:
            produced.setdefault(out.request.request_id, []).extend(out.token_ids)
            if out.finish_reason:
                finished.add(out.request.request_id)
        if not busy:
            break
    return {rid: tokens for rid, tokens in produced.items() if rid in finished}


def two_workers(**overrides: int | bool | str) -> tuple[Scheduler, KvManager]:
    s, kv = make_scheduler(**overrides), KvManager()
    start(s, kv, details(), name=W0)
    start(s, kv, details(), name=W1)
    return s, kv


def test_a_worker_admits_only_what_was_placed_on_it() -> None:
    s, _ = two_workers(routing="round-robin")
    for i in range(4):
        submit(s, f"r{i}", prompt_len=6)
    assert queued_on(s, W0) == ["r0", "r2"] and queued_on(s, W1) == ["r1", "r3"]
    plan = s.plan(W0)
    assert plan is not None and plan.batch.request_ids == ["r0", "r2"]
    assert queued_on(s, W1) == ["r1", "r3"] and s.num_waiting == 2


@pytest.mark.parametrize("routing", ["prefix", "least-loaded", "round-robin"])
def test_every_mode_finishes_every_request_with_no_leak(routing: str) -> None:
    s, kv = two_workers(routing=routing)
    for i in range(12):
        submit_tokens(s, f"r{i}", shared_prefix(i % 3, i), max_tokens=3 + i % 4)
    done = run_workers(s, kv, [W0, W1])
    assert done == {f"r{i}": [100 + k for k in range(3 + i % 4)] for i in range(12)}
    assert kv.usage(W0).used_blocks == kv.usage(W1).used_blocks == 0
    assert not s.requests and s.num_waiting == 0 and s.waiting.tokens == 0


def hit_rate(s: Scheduler) -> float:
    return s.stats.prefix_cache_hits / s.stats.prefix_cache_queries


def test_prefix_routing_computes_each_shared_prefix_once() -> None:
    # Three prefixes, two requests each, all arriving before any step: prefix
    # routing keeps each prefix on one worker, so each is computed once; round
    # robin splits two of them over both workers.
    rates = {}
    for routing in ("prefix", "round-robin", "least-loaded"):
        s, kv = two_workers(routing=routing)
        for i in range(6):
            submit_tokens(s, f"r{i}", shared_prefix(i % 3, i))
        run_workers(s, kv, [W0, W1])
        rates[routing] = hit_rate(s)
        counters = s.stats.per_worker
        assert counters[W0].prefix_cache_queries + counters[W1].prefix_cache_queries == (
            s.stats.prefix_cache_queries)
    # 6 prompts of 27 tokens; each of 3 prefixes hit (24 tokens) by its second request.
    assert rates["prefix"] == pytest.approx(3 * 24 / (6 * 27))
    assert rates["round-robin"] < rates["prefix"]
    assert rates["least-loaded"] < rates["prefix"]


def test_the_bounds_count_every_queue() -> None:
    s, _ = two_workers(routing="round-robin", max_waiting=3)
    for i in range(4):
        submit(s, f"r{i}", prompt_len=4)
    _, failures = s.take_outputs()
    assert [f.failure.request_id for f in failures] == ["r3"]
    assert len(queued_on(s, W0)) + len(queued_on(s, W1)) == 3


def test_requests_wait_unplaced_until_a_worker_joins() -> None:
    s, kv = make_scheduler(), KvManager()
    submit(s, "early", prompt_len=5)
    assert len(s.waiting.unplaced) == 1 and s.num_waiting == 1
    start(s, kv, details(), name=W1)
    assert queued_on(s, W1) == ["early"] and not len(s.waiting.unplaced)
    assert run_workers(s, kv, [W1]) == {"early": [100, 101, 102, 103]}


def test_a_lost_workers_queue_and_running_requests_move_to_the_others() -> None:
    s, kv = two_workers(routing="round-robin", max_num_seqs=1)
    for i in range(4):
        submit(s, f"r{i}", prompt_len=6, max_tokens=5)
    assert s.plan(W0) is not None  # r0 runs on worker/0, r2 waits there
    assert queued_on(s, W0) == ["r2"]
    s.remove_worker(W0)
    assert sorted(queued_on(s, W1)) == ["r0", "r1", "r2", "r3"]
    assert s.requests["r0"].status == RequestStatus.WAITING
    done = run_workers(s, kv, [W1])
    assert done == {f"r{i}": [100 + k for k in range(5)] for i in range(4)}


def test_a_new_worker_gets_new_requests() -> None:
    # `meshserve scale worker=2`: the joining worker is empty, so least work.
    s, kv = make_scheduler(routing="prefix"), KvManager()
    start(s, kv, details(), name=W0)
    submit_tokens(s, "old", shared_prefix(0, 0), max_tokens=50)
    assert s.plan(W0) is not None
    start(s, kv, details(), name=W1)
    submit_tokens(s, "new", shared_prefix(1, 0))
    assert queued_on(s, W1) == ["new"]
    # While one that shares the running request's prefix follows it.
    submit_tokens(s, "same", shared_prefix(0, 1))
    assert queued_on(s, W0) == ["same"]


def test_an_idle_worker_takes_a_backlogged_peers_tail() -> None:
    # Everything was placed on worker/0 (one seat there); worker/1 plans with an
    # empty queue and takes half of the backlog, the latest arrivals.
    s, kv = two_workers(max_num_seqs=1, routing_balance_tokens=10**6)
    for i in range(5):
        submit_tokens(s, f"r{i}", shared_prefix(0, i), max_tokens=8)
    assert len(queued_on(s, W0)) == 5  # a shared prefix: all follow the first
    workers = {W0: BookkeepingWorker(block_size=4), W1: BookkeepingWorker(block_size=4)}
    plan = s.plan(W0)  # admits r0; the other four stay: backlogged
    assert plan is not None and s.workers[W0].backlogged
    s.on_result(W0, workers[W0].execute(plan))
    plan = s.plan(W1)
    assert plan is not None and plan.batch.request_ids == ["r4"]  # one free seat
    assert queued_on(s, W0) == ["r1", "r2", "r3"] and queued_on(s, W1) == []
    assert s.stats.per_worker[W1].rebalanced_in == 1
    s.on_result(W1, workers[W1].execute(plan))
    done = run_workers(s, kv, [W0, W1], workers)
    assert done == {f"r{i}": [100 + k for k in range(8)] for i in range(5)}


def test_no_rebalance_from_a_queue_that_is_not_backlogged() -> None:
    s, _ = two_workers(routing_balance_tokens=10**6)
    for i in range(3):
        submit_tokens(s, f"r{i}", shared_prefix(0, i))
    assert s.plan(W1) is None  # worker/0 has not planned: nothing is backed up yet
    assert len(queued_on(s, W0)) == 3


def test_a_swapped_request_stays_on_its_worker() -> None:
    # 12 blocks of 4 on worker/0: three requests of 12 prompt + 20 outputs force
    # swap preemptions there; worker/1 idles with an empty queue the whole time.
    s = make_scheduler(lease_blocks=12, routing_balance_tokens=10**6)
    kv = KvManager(host_swap_gb=gb_for(64))
    start(s, kv, swap_details(), name=W0)
    for i in range(3):
        submit_tokens(s, f"r{i}", [7] * 12, max_tokens=20)
    start(s, kv, swap_details(num_blocks=64), name=W1)
    workers = {W0: SwappingWorker(block_size=4), W1: SwappingWorker(block_size=4)}
    tempted = 0  # plans of worker/1 while worker/0's backlog held a swapped request
    for _ in range(2000):
        for name in (W0, W1):
            swapped = [r for r in s.workers[W0].waiting.requests()
                       if r.status == RequestStatus.SWAPPED]
            tempted += name == W1 and bool(swapped) and s.workers[W0].backlogged
            if (plan := s.plan(name)) is not None:  # one step each in turn
                s.on_result(name, workers[name].execute(plan))
            assert all(r.status != RequestStatus.SWAPPED for r in s.workers[W1].waiting.requests())
            assert workers[W1].swapped_in == 0
            sync = s.workers[name].lease.sync_message()
            if sync is not None:
                s.on_lease(kv.sync(sync))
        s.take_outputs()
        if not s.requests:
            break
    assert not s.requests and tempted
    assert s.stats.num_swap_outs > 0 and workers[W0].swapped_in == s.stats.num_swap_outs


def test_abort_reaches_a_request_queued_on_a_worker() -> None:
    s, _ = two_workers(routing="round-robin")
    submit(s, "a", prompt_len=4)
    submit(s, "b", prompt_len=4)
    s.abort(["b"])
    assert queued_on(s, W1) == [] and s.num_waiting == 1 and s.waiting.tokens == 4
