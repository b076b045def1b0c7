"""Placement, the policy alone: which worker a new request waits for, by prefix
overlap against load, least-loaded or round-robin (services/scheduler/placement.py).
Workers are real ``WorkerSlot``s whose leases were opened by the real KvManager."""

from __future__ import annotations

from array import array

import pytest

from services.kvcache.manager import KvManager
from services.scheduler.block_tables import commit_full_blocks
from services.scheduler.config import SchedulerConfig
from services.scheduler.placement import Placement, load
from services.scheduler.request import Request
from services.scheduler.scheduler import Scheduler
from services.scheduler.worker_slot import WorkerSlot
from shared.protocol.generation import DetokenizeSpec, SamplingParams
from tests.unit.test_scheduler_core import details

BLOCK = 4


def make_request(rid: str, tokens: list[int], arrival: int = 0) -> Request:
    return Request(rid, len(tokens), array("i", tokens), SamplingParams(max_tokens=4),
                   DetokenizeSpec(), priority=0, arrival=arrival, owner="tokenizer/0")


def prefix(k: int, length: int = 32) -> list[int]:
    """Prompt prefix number ``k``: ``length`` tokens no other prefix shares."""
    return [1000 * (k + 1) + i for i in range(length)]


def slots(*names: str) -> list[WorkerSlot]:
    s, kv = Scheduler(SchedulerConfig(lease_blocks=48)), KvManager()
    for name in names:
        s.on_lease(kv.open_pool(s.add_worker(name, details(block_size=BLOCK))))
    return [s.workers[name] for name in names]


def cache(slot: WorkerSlot, tokens: list[int]) -> None:
    """Make ``slot``'s pool cache these tokens' full blocks, as a request computing
    them does (it keeps holding them: blocks never synced would lose their hashes
    when released)."""
    request = make_request(f"warm-{tokens[0]}", tokens)
    request.block_ids = slot.lease.take(request.request_id, len(tokens) // BLOCK) or []
    request.num_scheduled = len(tokens)
    commit_full_blocks(slot.lease, request)


def place(placement: Placement, candidates: list[WorkerSlot], request: Request) -> str:
    """Choose and queue, as dispatch.py does; the chosen worker's name."""
    slot = placement.choose(request, candidates)
    assert slot is not None
    slot.waiting.push(request, *placement.work(request, slot))
    return slot.name


def test_prefix_routing_follows_the_cached_prefix() -> None:
    w0, w1 = slots("worker/0", "worker/1")
    cache(w1, prefix(0))
    # Both idle: only the cache tells them apart (a load tie goes to worker/0).
    chosen = Placement("prefix").choose(make_request("a", [*prefix(0), 7, 8]), [w0, w1])
    assert chosen is w1
    assert Placement("least-loaded").choose(make_request("b", [*prefix(0), 7]), [w0, w1]) is w0


def test_a_burst_sharing_prefixes_follows_the_first_request_of_each() -> None:
    # Nothing is computed yet: the queued requests' prefixes are what placement sees.
    w0, w1 = slots("worker/0", "worker/1")
    placement = Placement("prefix")
    where: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    for i in range(9):
        k = i % 3
        where[k].add(place(placement, [w0, w1], make_request(f"r{i}", [*prefix(k), i], i)))
    assert all(len(names) == 1 for names in where.values()), where
    # Three prefixes on two workers: one holds two, the other one.
    assert sorted(len(w.waiting) for w in (w0, w1)) == [3, 6]


@pytest.mark.parametrize("mode", ["least-loaded", "round-robin"])
def test_the_load_and_turn_modes_split_prefixes(mode: str) -> None:
    w0, w1 = slots("worker/0", "worker/1")
    placement = Placement(mode)
    where: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    for i in range(9):
        k = i % 3
        where[k].add(place(placement, [w0, w1], make_request(f"r{i}", [*prefix(k), i], i)))
    assert any(len(names) == 2 for names in where.values()), where


def test_least_loaded_counts_queued_work_and_running_prefill() -> None:
    w0, w1 = slots("worker/0", "worker/1")
    w0.waiting.push(make_request("q", list(range(40))))
    assert load(w0) == 40 and load(w1) == 0
    placement = Placement("least-loaded")
    assert placement.choose(make_request("a", [1, 2, 3]), [w0, w1]) is w1
    # A running request owing 50 prompt tokens, and its next decode token.
    running = make_request("r", list(range(60)))
    w1.admit(running)
    running.num_scheduled = 10
    w1.note_prefill_owed()
    assert load(w1) == 50 + 1
    assert placement.choose(make_request("b", [1, 2, 3]), [w0, w1]) is w0


def test_round_robin_takes_turns_in_name_order() -> None:
    w0, w1, w2 = slots("worker/0", "worker/1", "worker/2")
    placement = Placement("round-robin")
    chosen = [placement.choose(make_request(f"r{i}", [i + 1]), [w2, w0, w1]) for i in range(6)]
    assert [c.name for c in chosen if c] == ["worker/0", "worker/1", "worker/2"] * 2


def test_a_hot_prefix_spills_over_once_the_gap_passes_the_balance_threshold() -> None:
    w0, w1 = slots("worker/0", "worker/1")
    cache(w0, prefix(0))
    placement = Placement("prefix", balance_tokens=30)
    names = [place(placement, [w0, w1], make_request(f"r{i}", [*prefix(0), i, i], i))
             for i in range(40)]
    # The hot prefix's worker takes the first ones (each is 2 new tokens there) ...
    assert names[:15] == ["worker/0"] * 15
    # ... until it is 30 tokens of work ahead: then the other worker gets some.
    assert "worker/1" in names
    assert abs(load(w0) - load(w1)) <= 30 + len(prefix(0)) + 2
    # Without the threshold, the prefix's worker takes them until its load reaches
    # weight x overlap (2 x 32 tokens: 32 requests of 2 new tokens each).
    u0, u1 = slots("worker/0", "worker/1")
    cache(u0, prefix(0))
    sticky = Placement("prefix", balance_tokens=10**9)
    names = [place(sticky, [u0, u1], make_request(f"s{i}", [*prefix(0), i, i], i))
             for i in range(40)]
    assert names[:32] == ["worker/0"] * 32 and names[32] == "worker/1"


def test_only_candidates_are_chosen_and_none_without_any() -> None:
    w0, w1 = slots("worker/0", "worker/1")
    cache(w0, prefix(0))
    assert Placement("prefix").choose(make_request("a", [*prefix(0), 1]), [w1]) is w1
    assert Placement("prefix").choose(make_request("a", [1]), []) is None


def test_without_prefix_caching_prefix_routing_is_least_loaded() -> None:
    w0, w1 = slots("worker/0", "worker/1")
    cache(w0, prefix(0))
    w0.waiting.push(make_request("q", list(range(5))))
    placement = Placement("prefix", prefix_caching=False)
    assert placement.choose(make_request("a", [*prefix(0), 1]), [w0, w1]) is w1
    assert placement.work(make_request("b", [*prefix(0), 1]), w0) == (33, [])


def test_a_request_owing_prompt_logprobs_has_no_overlap() -> None:
    w0, w1 = slots("worker/0", "worker/1")
    cache(w1, prefix(0))
    request = make_request("lp", [*prefix(0), 1])
    request.sampling = SamplingParams(max_tokens=4, prompt_logprobs=0)
    assert Placement("prefix").choose(request, [w0, w1]) is w0


def test_idle_workers_share_new_prefixes() -> None:
    # Light load: every load is 0 when a request arrives (the last one finished).
    # The first request of each new prefix goes to the worker caching less, and
    # later ones follow their prefix, instead of every one landing on worker/0.
    w0, w1 = slots("worker/0", "worker/1")
    placement = Placement("prefix")
    where: dict[int, set[str]] = {k: set() for k in range(4)}
    for i in range(16):
        k = i % 4
        request = make_request(f"r{i}", [*prefix(k), i], i)
        slot = placement.choose(request, [w0, w1])
        assert slot is not None
        if slot.name not in where[k]:
            cache(slot, prefix(k))  # it ran and finished: cached, nothing queued
        where[k].add(slot.name)
    assert all(len(names) == 1 for names in where.values()), where
    assert sorted(name for names in where.values() for name in names) == (
        ["worker/0"] * 2 + ["worker/1"] * 2)


def test_least_loaded_takes_tied_workers_in_turn() -> None:
    w0, w1 = slots("worker/0", "worker/1")
    placement = Placement("least-loaded")
    chosen = [placement.choose(make_request(f"r{i}", [i + 1]), [w0, w1]) for i in range(4)]
    assert [c.name for c in chosen if c] == ["worker/0", "worker/1"] * 2
