"""Copy-on-write forks (``Submit.n > 1``) and the cache salt, through the scheduler,
its lease and the real KvManager, with the bookkeeping worker checking every K/V
slot a step reads (seeded forks diverge, so a fork writing a shared block shows)."""

from __future__ import annotations

import random

import hypothesis.strategies as st
import pytest
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


def submit_n(s: Scheduler, rid: str, prompt: list[int], n: int, max_tokens: int = 6,
             seed: int | None = 1, salt: str = "") -> None:
    s.submit(Submit(rid, pack_i32(prompt),
                    SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=seed),
                    DetokenizeSpec(), n=n, cache_salt=salt), owner="tokenizer/0")


def assert_no_leak(s: Scheduler, kv: KvManager) -> None:
    usage = kv.usage(W)
    assert usage.used_blocks == 0 and usage.requests == 0
    assert not any(s.workers[W].lease.refs)
    assert not s.requests and not s._groups
    lease = s.workers[W].lease
    if not lease.sync_in_flight:  # every block leased there is in the lease here
        assert usage.leased_blocks == lease.available


def test_choices_ending_before_any_sync_give_their_blocks_back_to_the_lease() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    worker = BookkeepingWorker(block_size=4)
    submit_n(s, "r", list(range(10, 20)), n=2)
    plan = s.plan(W)  # the leader's prompt; the fork shares its fresh blocks
    assert plan is not None and [n.request_id for n in plan.new] == ["r-0", "r-1"]
    result = worker.execute(plan)
    s.abort(["r-0", "r-1"])
    s.on_result(W, result)
    s.take_outputs()
    run_until_idle(s, kv, worker)
    assert_no_leak(s, kv)


@pytest.mark.parametrize("prompt_len", [10, 12, 3])  # partial last block, aligned, one block
def test_forks_share_the_prompt_and_copy_only_the_written_block(prompt_len: int) -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    worker = BookkeepingWorker(block_size=4)
    prompt = list(range(10, 10 + prompt_len))
    submit_n(s, "r", prompt, n=3)
    done = run_until_idle(s, kv, worker)
    assert done == {f"r-{i}": [100 + k + 50 * (1 + i) for k in range(6)] for i in range(3)}
    prompt_blocks = -(-prompt_len // 4)
    # Each fork took over all prompt blocks, the partial last one included ...
    assert s.stats.fork_shared_blocks == 2 * prompt_blocks
    # ... and n - 1 copies of the prompt's last block were made, nothing else.
    assert s.stats.cow_block_copies == 2 and len(worker.copies) == 2
    assert len({src for src, _ in worker.copies}) == 1
    # Only the leader computed the prompt; each fork recomputed its last token.
    assert worker.cached_tokens == 2 * (prompt_len - 1)
    assert_no_leak(s, kv)


def test_fork_tables_share_every_block_but_the_copied_one() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    worker = BookkeepingWorker(block_size=4)
    submit_n(s, "r", list(range(10, 24)), n=3, max_tokens=20)  # 14 tokens: 4 blocks
    pending = []
    for _ in range(3):  # prompt, then the forks' first steps
        plan = s.plan(W)
        assert plan is not None
        pending.append(worker.execute(plan))
        sync = s.workers[W].lease.sync_message()
        if sync is not None:
            s.on_lease(kv.sync(sync))
        s.on_result(W, pending.pop(0))
    tables = [worker.blocks[f"r-{i}"] for i in range(3)]
    assert tables[0][:3] == tables[1][:3] == tables[2][:3]
    assert len({t[3] for t in tables}) == 3
    # The KV manager counts the same holders: shared blocks have ref count 3.
    pool = kv.pools[W]
    assert [pool.ref_count(b) for b in tables[0][:3]] == [3, 3, 3]
    assert all(pool.ref_count(t[3]) == 1 for t in tables)
    run_until_idle(s, kv, worker)
    assert_no_leak(s, kv)


def test_unseeded_forks_are_greedy_alike_and_leak_nothing() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    submit_n(s, "r", list(range(10, 19)), n=4, seed=None)
    done = run_until_idle(s, kv, BookkeepingWorker(block_size=4))
    assert done == {f"r-{i}": [100 + k for k in range(6)] for i in range(4)}
    assert_no_leak(s, kv)


def test_aborting_the_leader_before_it_forked_promotes_the_next_choice() -> None:
    s, kv = make_scheduler(max_num_batched_tokens=8, max_prefill_chunk=8), KvManager()
    start(s, kv, details())
    worker = BookkeepingWorker(block_size=4)
    submit_n(s, "r", list(range(10, 30)), n=3)  # 20 tokens: 3 chunks
    plan = s.plan(W)
    assert plan is not None and plan.batch.request_ids == ["r-0"]
    s.on_result(W, worker.execute(plan))
    s.abort(["r-0", "r-2"])
    aborted, _ = s.take_outputs()
    assert sorted((o.request.request_id, o.finish_reason) for o in aborted) == [
        ("r-0", "abort"), ("r-2", "abort")]
    done = run_until_idle(s, kv, worker)
    assert done == {"r-1": [100 + k + 100 for k in range(6)]}
    assert s.stats.cow_block_copies == 0
    assert_no_leak(s, kv)


def test_aborting_forks_while_running_frees_their_copies() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    worker = BookkeepingWorker(block_size=4)
    submit_n(s, "r", list(range(10, 20)), n=3, max_tokens=30)
    for _ in range(4):
        plan = s.plan(W)
        assert plan is not None
        s.on_result(W, worker.execute(plan))
        sync = s.workers[W].lease.sync_message()
        if sync is not None:
            s.on_lease(kv.sync(sync))
    s.abort(["r-1", "r-0"])
    s.take_outputs()
    done = run_until_idle(s, kv, worker)
    assert list(done) == ["r-2"]
    assert_no_leak(s, kv)


def test_forks_preempted_by_recompute_finish_alike() -> None:
    s, kv = make_scheduler(lease_blocks=4), KvManager()
    start(s, kv, details(num_blocks=12))
    submit_n(s, "r", list(range(10, 20)), n=3, max_tokens=14)
    done = run_until_idle(s, kv, BookkeepingWorker(block_size=4))
    assert done == {f"r-{i}": [100 + k + 50 * (1 + i) for k in range(14)] for i in range(3)}
    assert s.stats.num_preemptions > 0
    assert_no_leak(s, kv)


def test_resent_submit_moves_every_live_choice() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    submit_n(s, "r", list(range(10, 20)), n=3)
    msg = Submit("r", pack_i32(range(10, 20)), SamplingParams(temperature=0.0, seed=1),
                 DetokenizeSpec(), n=3)
    s.abort(["r-2"])
    result = s.submit(msg, owner="tokenizer/1")
    assert sorted(t.request.request_id for t in result.takeovers) == ["r-0", "r-1"]
    assert result.ended == ["r-2"] and result.queued == []


def test_cache_salt_separates_prefixes() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    worker = BookkeepingWorker(block_size=4)
    prompt = list(range(10, 31))
    submit_n(s, "a", prompt, n=1, salt="alice")
    run_until_idle(s, kv, worker)
    submit_n(s, "b", prompt, n=1, salt="bob")
    run_until_idle(s, kv, worker)
    assert s.stats.prefix_cache_hits == 0
    submit_n(s, "c", prompt, n=1, salt="alice")
    plan = s.plan(W)
    assert plan is not None and plan.new[0].num_computed_tokens == 20
    assert list(unpack_i32(plan.batch.num_tokens)) == [1]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.sampled_from([12, 16, 64]),
       lease=st.sampled_from([2, 4, 16]))
def test_fork_workload_matches_independent_requests_and_leaks_nothing(
        seed: int, num_blocks: int, lease: int) -> None:
    """Random n, prompts over shared prefixes, aborts of some choices, pools small
    enough to preempt: every choice gets what an independent request with its seed
    gets, every read slot holds the reader's own prefix, and nothing stays held."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 50) for _ in range(rng.randrange(1, 10))] for _ in range(2)]
    jobs = []
    for i in range(rng.randrange(1, 5)):
        prompt = rng.choice(prefixes) + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 6))]
        jobs.append((f"r{i}", prompt, rng.randrange(1, 4), rng.randrange(1, 8)))
    choice_ids = [f"{rid}-{i}" if n > 1 else rid for rid, _, n, _ in jobs for i in range(n)]
    aborted = {c for c in choice_ids if rng.random() < 0.2}
    for caching in (True, False):
        s = make_scheduler(lease_blocks=lease, enable_prefix_caching=caching)
        kv = KvManager()
        start(s, kv, details(num_blocks=num_blocks, max_len=48))
        worker = BookkeepingWorker(block_size=4)
        for rid, prompt, n, max_tokens in jobs:
            submit_n(s, rid, prompt, n=n, max_tokens=max_tokens, seed=1)
        if aborted:
            plan = s.plan(W)
            result = worker.execute(plan) if plan is not None else None
            s.abort(sorted(aborted))
            if result is not None:
                s.on_result(W, result)
        early: dict[str, list[int]] = {}
        ended_early = set()
        for out in s.take_outputs()[0]:
            early.setdefault(out.request.request_id, []).extend(out.token_ids)
            if out.finish_reason is not None:
                ended_early.add(out.request.request_id)
        later = run_until_idle(s, kv, worker)
        done = {rid: early.get(rid, []) + later.get(rid, [])
                for rid in {*later, *ended_early}}
        assert_no_leak(s, kv)
        for rid, _, n, max_tokens in jobs:
            for i in range(n):
                cid = f"{rid}-{i}" if n > 1 else rid
                if cid not in aborted:
                    seed_i = 1 + (i if n > 1 else 0)
                    assert done[cid] == [100 + k + 50 * seed_i for k in range(max_tokens)]
