"""Prefix caching through the scheduler, its lease mirror and the real KvManager,
with the bookkeeping worker checking that every K/V slot a step reads holds the
reading request's own token prefix."""

from __future__ import annotations

import random

import hypothesis.strategies as st
from hypothesis import given, settings

from services.kvcache.manager import KvManager
from services.scheduler.scheduler import Scheduler
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit
from tests.unit.test_scheduler_core import (
    BookkeepingWorker,
    details,
    make_scheduler,
    run_until_idle,
    start,
)

W = "worker/0"


def submit_ids(s: Scheduler, rid: str, prompt: list[int], max_tokens: int = 4) -> None:
    s.submit(Submit(rid, pack_i32(prompt), SamplingParams(max_tokens=max_tokens,
                                                          temperature=0.0),
                    DetokenizeSpec()), owner="tokenizer/0")


def assert_no_leak(s: Scheduler, kv: KvManager) -> None:
    usage = kv.usage(W)
    assert usage.used_blocks == 0 and usage.requests == 0
    assert not any(s.workers[W].lease.refs)


def test_hit_on_a_finished_requests_blocks_skips_their_tokens() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    worker = BookkeepingWorker(block_size=4)
    shared = list(range(10, 30))  # 5 blocks of 4
    submit_ids(s, "first", [*shared, 7])
    run_until_idle(s, kv, worker)
    submit_ids(s, "second", [*shared, 8, 9])
    plan = s.plan(W)
    assert plan is not None
    assert [n.num_computed_tokens for n in plan.new] == [20]
    assert list(unpack_i32(plan.batch.num_tokens)) == [2]
    worker.execute(plan)
    assert s.stats.prefix_cache_hits == 20
    assert s.stats.prefix_cache_queries == 21 + 22


def test_full_prompt_hit_recomputes_the_last_token() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    worker = BookkeepingWorker(block_size=4)
    prompt = list(range(10, 26))  # exactly 4 blocks
    submit_ids(s, "a", prompt)
    run_until_idle(s, kv, worker)
    submit_ids(s, "b", prompt)
    plan = s.plan(W)
    assert plan is not None and plan.new[0].num_computed_tokens == 12
    assert list(unpack_i32(plan.batch.num_tokens)) == [4]


def test_same_step_siblings_share_the_prompt() -> None:
    """n > 1 fans out into sibling requests with one prompt: the second one hits
    the first one's blocks in the very step that computes them."""
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    prompt = list(range(10, 31))
    for i in range(3):
        submit_ids(s, f"r-{i}", prompt)
    plan = s.plan(W)
    assert plan is not None
    assert [n.num_computed_tokens for n in plan.new] == [0, 20, 20]
    _, tables = plan.batch.unpack()
    assert tables[0][:5] == tables[1][:5] == tables[2][:5]
    assert len({tables[0][5], tables[1][5], tables[2][5]}) == 3  # own partial blocks


def test_caching_off_never_hits() -> None:
    s, kv = make_scheduler(enable_prefix_caching=False), KvManager()
    start(s, kv, details())
    worker = BookkeepingWorker(block_size=4)
    for i in range(3):
        submit_ids(s, f"r{i}", list(range(10, 40)))
    run_until_idle(s, kv, worker)
    assert worker.cached_tokens == 0 and s.stats.prefix_cache_hits == 0
    assert kv.usage(W).cached_blocks == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.sampled_from([10, 16, 64]),
       lease=st.sampled_from([2, 4, 16]))
def test_shared_prefix_workload_matches_uncached_and_leaks_nothing(
        seed: int, num_blocks: int, lease: int) -> None:
    """Random prompts over a few shared prefixes, random aborts, a pool small enough
    to preempt: the same tokens as without the cache, and nothing held at the end."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 50) for _ in range(rng.randrange(1, 14))] for _ in range(3)]
    jobs = []
    for i in range(rng.randrange(1, 8)):
        prompt = rng.choice(prefixes) + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 6))]
        jobs.append((f"r{i}", prompt, rng.randrange(1, 9)))
    aborted = {rid for rid, _, _ in jobs if rng.random() < 0.2}
    results = []
    for caching in (True, False):
        s = make_scheduler(lease_blocks=lease, enable_prefix_caching=caching)
        kv = KvManager()
        start(s, kv, details(num_blocks=num_blocks, max_len=64))
        worker = BookkeepingWorker(block_size=4)
        for rid, prompt, max_tokens in jobs:
            submit_ids(s, rid, prompt, max_tokens)
        if aborted:
            # Some of them run, some wait, when the aborts arrive.
            plan = s.plan(W)
            result = worker.execute(plan) if plan is not None else None
            s.abort(sorted(aborted))
            if result is not None:
                s.on_result(W, result)
        done = run_until_idle(s, kv, worker)
        assert_no_leak(s, kv)
        results.append({rid: toks for rid, toks in done.items() if rid not in aborted})
    assert results[0] == results[1]
