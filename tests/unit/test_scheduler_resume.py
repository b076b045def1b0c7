"""A scheduler restart, as the pure parts see it: a new ``Scheduler`` takes
resuming Submits (prompt + the outputs generated before) and continues each
request where it stopped, and the KV manager closes the dead incarnation's pools."""

from __future__ import annotations

from msgspec.structs import replace

from services.kvcache.manager import KvManager
from services.scheduler.scheduler import Scheduler
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit
from shared.protocol.kv import KvSync
from shared.protocol.tables import RequestBlocks
from tests.unit.test_scheduler_core import (
    BookkeepingWorker,
    details,
    make_scheduler,
    run_until_idle,
    start,
)

PROMPT = list(range(10, 16))


def resumption(rid: str, outputs: list[int], max_tokens: int = 7, min_tokens: int = 0,
               n: int = 1) -> Submit:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, min_tokens=min_tokens)
    return Submit(rid, pack_i32(PROMPT), sampling, DetokenizeSpec(), n=n,
                  output_token_ids=pack_i32(outputs), resumed=True)


def test_a_resumed_request_continues_where_it_stopped() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    # The bookkeeping worker samples 100 + k for output k: 3 outputs were made before.
    s.submit(resumption("r", [100, 101, 102]), owner="tokenizer/0")
    plan = s.plan("worker/0")
    assert plan is not None
    (new,) = plan.new
    assert list(unpack_i32(new.token_ids)) == [*PROMPT, 100, 101, 102]
    assert new.num_output_tokens == 3  # seeded noise continues at output index 3
    worker = BookkeepingWorker(block_size=4)
    s.on_result("worker/0", worker.execute(plan))
    outputs, _ = s.take_outputs()
    assert [(o.token_ids, o.num_prior, o.request.prompt_len) for o in outputs] == [
        ([103], 3, len(PROMPT))]
    # max_tokens counts the outputs made before the restart: 4 more, then "length".
    done = run_until_idle(s, kv, worker)
    assert done == {"r": [104, 105, 106]}
    assert kv.usage("worker/0").used_blocks == 0 and not s.requests


def test_min_tokens_counts_the_outputs_made_before() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    s.submit(resumption("r", [100, 101, 102], min_tokens=5), owner="tokenizer/0")
    # EOS as output 3 is the 4th output: below min_tokens, so it does not stop.
    done = run_until_idle(s, kv, BookkeepingWorker(block_size=4, eos_at={"r": 3}))
    assert done["r"][0] == 2 and len(done["r"]) == 4


def test_a_full_queue_still_takes_resumptions() -> None:
    s = make_scheduler(max_waiting=1)
    s.submit(resumption("a", []), owner="tokenizer/0")
    s.submit(resumption("b", [100]), owner="tokenizer/0")
    s.submit(Submit("c", pack_i32(PROMPT), SamplingParams(), DetokenizeSpec()),
             owner="tokenizer/0")
    _, failures = s.take_outputs()
    assert [(f.failure.request_id, f.failure.status) for f in failures] == [("c", 429)]
    assert sorted(s.requests) == ["a", "b"]


def test_malformed_resumptions_are_refused() -> None:
    s = make_scheduler()
    bad = [
        resumption("n2", [100], n=2),
        resumption("done", [100, 101], max_tokens=2),
        Submit("unmarked", pack_i32(PROMPT), SamplingParams(), DetokenizeSpec(),
               output_token_ids=pack_i32([100])),
        Submit("odd", pack_i32(PROMPT), SamplingParams(), DetokenizeSpec(),
               output_token_ids=b"\x01\x02\x03", resumed=True),
    ]
    for msg in bad:
        s.submit(msg, owner="tokenizer/0")
    _, failures = s.take_outputs()
    assert [(f.failure.request_id, f.failure.status) for f in failures] == [
        ("n2-0", 400), ("n2-1", 400), ("done", 400), ("unmarked", 400), ("odd", 400)]
    assert not s.requests


def test_choices_resumed_one_by_one_are_taken_over_by_a_resent_request() -> None:
    s = make_scheduler()
    s.submit(resumption("f-0", [100]), owner="tokenizer/0")
    s.submit(resumption("f-2", []), owner="tokenizer/0")
    # Tokenizer 0 dies; the api re-sends the whole n = 3 request to tokenizer 1.
    result = s.submit(Submit("f", pack_i32(PROMPT), SamplingParams(), DetokenizeSpec(), n=3),
                      owner="tokenizer/1")
    assert not result.queued
    assert sorted(t.request.request_id for t in result.takeovers) == ["f-0", "f-2"]
    assert result.ended == ["f-1"]  # finished before the restart: no state for it
    assert sorted(s.requests) == ["f-0", "f-2"]


def test_kv_manager_closes_the_pools_of_a_dead_scheduler() -> None:
    kv = KvManager()
    old = Scheduler(make_scheduler().config)
    leases = [kv.open_pool(replace(old.add_worker(name, details()), owner="old"))
              for name in ("worker/0", "worker/1")]
    held = list(unpack_i32(leases[0].block_ids))[:3]
    kv.sync(KvSync("worker/0", 1, holds=RequestBlocks.pack({"a": held}), lease_target=8))
    assert kv.usage("worker/0").used_blocks == 3
    assert kv.reconcile("") == {} and kv.reconcile("old") == {}
    # The new incarnation re-opens worker/0 (worker/1 died meanwhile): both old
    # pools are closed, their leases and holds gone.
    new = Scheduler(make_scheduler().config)
    opened = replace(new.add_worker("worker/0", details()), owner="new")
    kv.open_pool(opened)
    assert sorted(kv.pools) == ["worker/0"]
    usage = kv.usage("worker/0")
    assert usage.used_blocks == 0 and usage.requests == 0
    assert usage.leased_blocks == opened.lease_target
    # The new incarnation's hello, seen after its open: nothing more to close.
    assert kv.reconcile("new") == {}
    assert sorted(kv.pools) == ["worker/0"]
