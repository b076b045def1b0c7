"""In-flight bookkeeping: offset deduplication across a tokenizer failover,
merging when the client is slow, failure, abort sets, replica choice, health."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.context import Context

from services.api.config import ApiConfig
from services.api.errors import ApiError
from services.api.generation_plan import GenerationPlan, PlanContext, plan_completion
from services.api.health import MeshHealth
from services.api.openai_schema import CompletionRequest
from services.api.requests import (
    ChoiceUpdate,
    DeltaOutcome,
    Flight,
    FlightRegistry,
    group_by_holder,
    pick_replica,
)
from shared.protocol.generation import SchedulerStatus, TextDelta

T0, T1 = b"tokenizer/0", b"tokenizer/1"


def make_plan(n: int = 1, response_id: str = "cmpl-1") -> GenerationPlan:
    context = PlanContext(served_model="m", config=ApiConfig(), response_id=response_id,
                          created=0)
    return plan_completion(CompletionRequest(prompt="p", n=n), context)


def make_flight(n: int = 1, response_id: str = "cmpl-1") -> Flight:
    return Flight(make_plan(n, response_id), Context())


def delta(request_id: str, text: str, offset: int, tokens: int,
          finish: str | None = None) -> TextDelta:
    return TextDelta(request_id, text, offset, 4, tokens, finish)


def test_text_is_taken_in_order_and_merged_while_the_client_is_slow() -> None:
    registry = FlightRegistry(max_inflight=8)
    flight = make_flight()
    registry.open(flight)
    assert not flight.has_news()
    assert registry.apply(delta("cmpl-1", "Hel", 0, 1)) is DeltaOutcome.ACCEPTED
    assert registry.apply(delta("cmpl-1", "lo", 3, 2)) is DeltaOutcome.ACCEPTED
    assert flight.take() == [ChoiceUpdate(0, "Hello", None)]
    assert not flight.has_news()
    registry.apply(delta("cmpl-1", "!", 5, 3, "stop"))
    assert flight.take() == [ChoiceUpdate(0, "!", "stop")]
    assert flight.finished
    assert (flight.prompt_tokens, flight.completion_tokens) == (4, 3)
    assert flight.finish_reasons() == ["stop"]
    assert registry.close(flight) == []  # finished: nothing to abort


def test_replay_after_failover_is_deduplicated() -> None:
    registry = FlightRegistry(max_inflight=8)
    flight = make_flight()
    registry.open(flight)
    registry.apply(delta("cmpl-1", "Hello ", 0, 1))
    # The new replica rebuilds from every output id and replays from offset 0.
    assert registry.apply(delta("cmpl-1", "Hello", 0, 1)) is DeltaOutcome.DUPLICATE
    assert registry.apply(delta("cmpl-1", "Hello world", 0, 2)) is DeltaOutcome.ACCEPTED
    registry.apply(delta("cmpl-1", "", 11, 2, "length"))
    updates = flight.take()
    assert "".join(u.text for u in updates) == "Hello world"
    assert updates[-1].finish_reason == "length"


def test_a_gap_is_reported_and_the_text_kept() -> None:
    registry = FlightRegistry(max_inflight=8)
    flight = make_flight()
    registry.open(flight)
    assert registry.apply(delta("cmpl-1", "late", 3, 2)) is DeltaOutcome.GAP
    assert flight.take() == [ChoiceUpdate(0, "late", None)]


@given(
    text=st.text(min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
    fail_after=st.integers(min_value=0, max_value=6),
    replay_cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
)
def test_any_failover_point_yields_the_text_exactly_once(
    text: str, cuts: list[int], fail_after: int, replay_cuts: list[int]
) -> None:
    def pieces(points: list[int]) -> list[tuple[int, str]]:
        bounds = sorted({0, len(text), *(min(c, len(text)) for c in points)})
        return [(a, text[a:b]) for a, b in pairwise(bounds)]

    registry = FlightRegistry(max_inflight=8)
    flight = make_flight()
    registry.open(flight)
    taken = []
    first = pieces(cuts)[:fail_after]  # the first replica dies after these
    for i, (offset, piece) in enumerate(first):
        registry.apply(delta("cmpl-1", piece, offset, i + 1))
        taken += flight.take()
    replay = pieces(replay_cuts)
    for i, (offset, piece) in enumerate(replay):
        last = i == len(replay) - 1
        registry.apply(delta("cmpl-1", piece, offset, i + 1, "stop" if last else None))
        taken += flight.take()
    assert "".join(u.text for u in taken) == text
    assert [u.finish_reason for u in taken if u.finish_reason] == ["stop"]


def test_choices_of_n_are_tracked_apart() -> None:
    registry = FlightRegistry(max_inflight=8)
    flight = make_flight(n=2)
    registry.open(flight)
    registry.apply(delta("cmpl-1-1", "b", 0, 1, "stop"))
    registry.apply(delta("cmpl-1-0", "a", 0, 1))
    assert sorted(flight.take(), key=lambda u: u.index) == [
        ChoiceUpdate(0, "a", None), ChoiceUpdate(1, "b", "stop")]
    assert not flight.finished
    registry.apply(delta("cmpl-1-0", "", 1, 1, "length"))
    assert flight.take() == [ChoiceUpdate(0, "", "length")]
    assert flight.finished and flight.completion_tokens == 2 and flight.prompt_tokens == 4


def test_unknown_late_and_inconsistent_deltas() -> None:
    registry = FlightRegistry(max_inflight=8)
    assert registry.apply(delta("nobody", "x", 0, 1)) is DeltaOutcome.UNKNOWN
    flight = make_flight()
    registry.open(flight)
    assert registry.apply(delta("cmpl-1", "x", -1, 1)) is DeltaOutcome.INCONSISTENT
    assert registry.apply(delta("cmpl-1", "x", 0, -1)) is DeltaOutcome.INCONSISTENT
    registry.close(flight)
    assert registry.apply(delta("cmpl-1", "x", 0, 1)) is DeltaOutcome.LATE
    assert registry.knows("cmpl-1") and not registry.knows("nobody")


def test_failure_ends_the_flight_and_only_live_choices_are_aborted() -> None:
    registry = FlightRegistry(max_inflight=8)
    flight = make_flight(n=3)
    registry.open(flight)
    for choice, holder in zip(flight.choices, (T0, T1, T0), strict=True):
        choice.holder = holder
    registry.apply(delta("cmpl-1-2", "done", 0, 1, "stop"))
    failed = registry.fail("cmpl-1-0", ApiError(429, "busy", code="server_busy"))
    assert failed is flight and flight.has_news()
    with pytest.raises(ApiError) as raised:
        flight.take()
    assert raised.value.status == 429
    assert registry.fail("nobody", ApiError(500, "x")) is None
    # 0 ended in the mesh with its failure, 2 finished: only 1 is still running.
    to_abort = registry.close(flight)
    assert [c.request_id for c in to_abort] == ["cmpl-1-1"]
    assert group_by_holder(to_abort) == {T1: ["cmpl-1-1"]}
    assert registry.close(flight) == []  # idempotent
    assert len(registry) == 0


def test_in_flight_bound_is_a_429() -> None:
    registry = FlightRegistry(max_inflight=3)
    registry.open(make_flight(n=2, response_id="a"))
    with pytest.raises(ApiError) as raised:
        registry.open(make_flight(n=2, response_id="b"))
    assert (raised.value.status, raised.value.code) == (429, "server_busy")
    registry.open(make_flight(n=1, response_id="c"))
    refused = make_flight(response_id="d")
    with pytest.raises(ApiError):
        registry.open(refused)
    assert registry.close(refused) == []  # nothing reached the mesh: nothing to abort


def test_held_by_and_outstanding_drive_failover_and_placement() -> None:
    registry = FlightRegistry(max_inflight=8)
    first, second = make_flight(response_id="a"), make_flight(n=2, response_id="b")
    registry.open(first)
    registry.open(second)
    first.choices[0].holder = T0
    second.choices[0].holder = T0
    second.choices[1].holder = T1
    assert registry.outstanding() == Counter({T0: 2, T1: 1})
    assert pick_replica([T0, T1], registry.outstanding()) == T1
    registry.apply(delta("a", "x", 0, 1, "stop"))
    assert [c.request_id for _f, c in registry.held_by(T0)] == ["b-0"]
    assert pick_replica([T1, T0], registry.outstanding()) == T0  # 1 each: lowest identity
    assert pick_replica([], registry.outstanding()) is None


@pytest.mark.anyio
async def test_wait_wakes_on_news_and_not_before() -> None:
    registry = FlightRegistry(max_inflight=8)
    flight = make_flight()
    registry.open(flight)
    with anyio.move_on_after(0.05) as idle:
        await flight.wait()
    assert idle.cancelled_caught
    async with anyio.create_task_group() as tg:
        tg.start_soon(flight.wait)
        await anyio.wait_all_tasks_blocked()
        registry.apply(delta("cmpl-1", "x", 0, 1))
    assert flight.take() == [ChoiceUpdate(0, "x", None)]
    flight.fail(ApiError(503, "gone"))
    with anyio.fail_after(1):
        await flight.wait()


def test_health_needs_a_tokenizer_and_a_fresh_scheduler_status_with_workers() -> None:
    health = MeshHealth(heartbeat_s=1.0)
    report = health.report(tokenizers=0, now=10.0)
    assert report.status == "unavailable"
    assert report.missing == ["no tokenizer replica is connected",
                              "no recent status from the scheduler"]
    health.on_scheduler_status(SchedulerStatus(workers=0, running=0, waiting=0), now=10.0)
    assert health.report(1, 10.5).missing == ["the scheduler reports no worker"]
    health.on_scheduler_status(SchedulerStatus(workers=2, running=0, waiting=0), now=11.0)
    ok = health.report(1, 11.5)
    assert ok.status == "ok" and ok.workers == 2 and ok.scheduler_connected
    # Three missed beats and the status is stale.
    assert health.report(1, 14.5).missing == ["no recent status from the scheduler"]
    health.on_scheduler_status(SchedulerStatus(workers=2, running=0, waiting=0), now=15.0)
    health.on_scheduler_lost()
    assert health.report(1, 15.0).status == "unavailable"
