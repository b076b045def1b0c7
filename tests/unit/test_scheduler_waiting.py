"""The waiting queue's bounds: ``max_waiting`` requests and ``max_waiting_tokens``
prompt tokens, refused with 429 ``server_busy``; the token count follows every way
a request leaves or re-enters the queue (admission, abort, preemption)."""

from __future__ import annotations

from services.kvcache.manager import KvManager
from services.scheduler.scheduler import Scheduler
from shared.protocol.envelope import pack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit
from tests.unit.test_scheduler_core import (
    BookkeepingWorker,
    details,
    make_scheduler,
    run_until_idle,
    start,
    submit,
)


def refused(s: Scheduler) -> dict[str, tuple[int, str]]:
    _, failures = s.take_outputs()
    return {f.failure.request_id: (f.failure.status, f.failure.code) for f in failures}


def test_prompt_tokens_past_the_bound_are_busy() -> None:
    s = make_scheduler(max_waiting_tokens=100)
    submit(s, "a", prompt_len=60)
    submit(s, "b", prompt_len=40)  # exactly at the bound: still queued
    submit(s, "c", prompt_len=1)
    assert refused(s) == {"c": (429, "server_busy")}
    assert s.waiting.tokens == 100 and s.num_waiting == 2


def test_busy_message_names_the_setting() -> None:
    s = make_scheduler(max_waiting_tokens=10)
    submit(s, "a", prompt_len=8)
    submit(s, "b", prompt_len=8)
    _, failures = s.take_outputs()
    (failure,) = failures
    assert "max_waiting_tokens=10" in failure.failure.message
    assert failure.failure.status == 429


def test_an_empty_queue_takes_a_prompt_longer_than_the_bound() -> None:
    # Refusing it would be forever: a retry could never fit.
    s = make_scheduler(max_waiting_tokens=10)
    submit(s, "huge", prompt_len=50)
    assert refused(s) == {}
    submit(s, "next", prompt_len=1)
    assert refused(s) == {"next": (429, "server_busy")}


def test_admission_and_abort_give_the_tokens_back() -> None:
    s, kv = make_scheduler(max_waiting_tokens=40, max_num_seqs=1), KvManager()
    start(s, kv, details())
    submit(s, "run", prompt_len=20, max_tokens=100)
    submit(s, "wait", prompt_len=20)
    assert s.waiting.tokens == 40
    assert s.plan("worker/0") is not None  # admits "run" only (one running slot)
    assert s.waiting.tokens == 20
    submit(s, "more", prompt_len=20)
    assert refused(s) == {} and s.waiting.tokens == 40
    s.abort(["wait", "more"])
    assert s.waiting.tokens == 0 and s.num_waiting == 0
    submit(s, "again", prompt_len=40)
    assert refused(s) == {}


def test_the_count_returns_to_zero_after_a_preempting_run() -> None:
    # A small pool forces preemptions: victims re-enter the queue with their
    # outputs (recompute) and leave it again; nothing may be counted twice.
    s = make_scheduler(max_waiting_tokens=10_000, preemption_mode="recompute")
    kv = KvManager()
    start(s, kv, details(num_blocks=12))
    for i in range(6):
        submit(s, f"r{i}", prompt_len=9, max_tokens=12)
    done = run_until_idle(s, kv, BookkeepingWorker(block_size=4))
    assert len(done) == 6
    assert s.stats.num_preemptions > 0
    assert s.waiting.tokens == 0 and s.num_waiting == 0


def test_fork_choices_count_their_shared_prompt_once() -> None:
    s = make_scheduler(max_waiting_tokens=100)
    sampling = SamplingParams(max_tokens=4, temperature=1.0, seed=1)
    s.submit(Submit("n4", pack_i32(range(10, 40)), sampling, DetokenizeSpec(), n=4),
             owner="tokenizer/0")
    assert refused(s) == {}
    assert s.waiting.tokens == 30
