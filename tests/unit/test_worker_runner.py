"""ModelRunner's contract: plans are checked whole before anything changes, results
come in plan order, and seeded sampling survives batching and preemption."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from services.worker.runner import ModelRunner
from shared.embedded_model import ensure_embedded_model
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import SamplingParams
from shared.protocol.step import NewRequest, StepBatch, StepPlan
from tests.local_engine import LocalEngine

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(ensure_embedded_model(), "cpu", "float32", num_kv_blocks=128, block_size=4)


def plan(
    step_id: int,
    *,
    new: list[NewRequest] | None = None,
    work: dict[str, int] | None = None,
    owners: list[int] | None = None,
    blocks: list[int] | None = None,
    finished: list[str] | None = None,
) -> StepPlan:
    """``blocks[j]`` is appended to the table of the ``owners[j]``-th request of ``work``."""
    work = work or {}
    appends: list[list[int]] = [[] for _ in work]
    for owner, block in zip(owners or [], blocks or [], strict=True):
        appends[owner].append(block)
    return StepPlan(
        step_id=step_id,
        finished=finished or [],
        new=new or [],
        batch=StepBatch.pack(list(work), list(work.values()), appends),
    )


def new(request_id: str, tokens: list[int], outputs: int = 0, **sampling: object) -> NewRequest:
    params = SamplingParams(**sampling) if sampling else GREEDY  # type: ignore[arg-type]
    return NewRequest(request_id, pack_i32(tokens), outputs, params)


def snapshot(runner: ModelRunner) -> dict[str, tuple[object, ...]]:
    return {
        rid: (tuple(s.token_ids), s.num_computed, tuple(s.block_ids), s.num_output_tokens)
        for rid, s in runner.requests.items()
    }


def test_prefill_then_decode_feeds_its_own_tokens(runner: ModelRunner) -> None:
    runner.reset()
    first = runner.execute(plan(1, new=[new("a", [5, 6, 7, 8, 9])], work={"a": 3},
                                owners=[0], blocks=[10]))
    assert first.error is None and first.request_ids == []  # mid-prefill: nothing sampled
    second = runner.execute(plan(2, work={"a": 2}, owners=[0], blocks=[11]))
    assert second.request_ids == ["a"] and len(unpack_i32(second.token_ids)) == 1
    third = runner.execute(plan(3, work={"a": 1}))
    assert third.request_ids == ["a"]
    state = runner.requests["a"]
    assert state.num_computed == 6 and len(state.token_ids) == 7 and state.num_output_tokens == 2
    assert state.block_ids == [10, 11]


def test_results_follow_plan_order_not_compute_order(runner: ModelRunner) -> None:
    runner.reset()
    runner.execute(plan(1, new=[new("d", [1, 2, 3])], work={"d": 3}, owners=[0], blocks=[0]))
    # "p" prefills (computed after decodes), "d" decodes; the plan lists "p" first.
    result = runner.execute(plan(2, new=[new("p", [4, 5, 6, 7])], work={"p": 4, "d": 1},
                                 owners=[0, 1], blocks=[1, 2]))
    assert result.request_ids == ["p", "d"]


BAD_PLANS = {
    "unknown request": plan(9, work={"ghost": 1}),
    "num_tokens for": StepPlan(9, batch=StepBatch(["a"], pack_i32([1, 1]), pack_i32([0]))),
    "num_blocks counts for": StepPlan(9, batch=StepBatch(["a"], pack_i32([1]), b"",
                                                         pack_i32([0]))),
    "whole number of int32": StepPlan(9, batch=StepBatch(["a"], b"\x01\x00", pack_i32([0]))),
    "duplicates": StepPlan(9, batch=StepBatch(["a", "a"], pack_i32([1, 1]),
                                              pack_i32([0, 0]))),
    "only 6 tokens are known": plan(9, work={"a": 2}, owners=[0], blocks=[3]),
    "need 2 blocks": plan(9, work={"a": 1, "b": 5}, new=[new("b", [1] * 8)],
                          owners=[1], blocks=[4]),
    "counts add up to": StepPlan(9, batch=StepBatch(["a"], pack_i32([1]), pack_i32([0]),
                                                    pack_i32([4]))),
    "outside the pool": plan(9, work={"a": 1}, owners=[0], blocks=[128]),
    "outside [0, 2048)": plan(9, new=[new("b", [1, 99999])]),
    "already running": plan(9, new=[new("a", [1, 2])]),
    "no tokens": plan(9, new=[new("b", [])]),
    "num_output_tokens": plan(9, new=[new("b", [1, 2], outputs=2)]),
    "top_p": plan(9, new=[new("b", [1, 2], top_p=0.0)]),
    "new twice": plan(9, new=[new("b", [1]), new("b", [2])]),
    # Finished requests are dropped first, so computing "a" after that is unknown.
    "unknown request 'a'": plan(9, work={"a": 1}, finished=["a"]),
}


@pytest.mark.parametrize("reason", list(BAD_PLANS))
def test_bad_plans_get_an_error_and_change_nothing(runner: ModelRunner, reason: str) -> None:
    runner.reset()
    runner.execute(plan(1, new=[new("a", [1, 2, 3, 4, 5])], work={"a": 5},
                        owners=[0, 0], blocks=[0, 1]))
    before = snapshot(runner)
    result = runner.execute(BAD_PLANS[reason])
    assert result.error is not None and result.request_ids == [] and result.token_ids == b""
    assert reason in result.error and result.step_id == 9
    assert snapshot(runner) == before
    # And the runner still serves the next good plan.
    assert runner.execute(plan(10, work={"a": 1}, owners=[0], blocks=[2])).request_ids == ["a"]


def test_finish_and_renew_in_one_plan_and_unknown_finishes_are_ignored(
    runner: ModelRunner,
) -> None:
    runner.reset()
    runner.execute(plan(1, new=[new("a", [1, 2, 3])], work={"a": 3}, owners=[0], blocks=[0]))
    result = runner.execute(plan(2, new=[new("a", [1, 2, 3, 4], outputs=1)], work={"a": 4},
                                 owners=[0], blocks=[5], finished=["a", "never-seen"]))
    assert result.error is None and result.request_ids == ["a"]
    assert runner.requests["a"].block_ids == [5]
    assert runner.execute(plan(3, finished=["a"])).error is None
    assert runner.requests == {}


def test_positions_beyond_max_model_len_are_refused() -> None:
    small = ModelRunner(ensure_embedded_model(), "cpu", "float32", num_kv_blocks=8,
                        block_size=4, max_model_len=6)
    assert small.details().max_model_len == 6
    ok = small.execute(plan(1, new=[new("a", [1] * 6)], work={"a": 6}, owners=[0, 0],
                            blocks=[0, 1]))
    assert ok.request_ids == ["a"]
    refused = small.execute(plan(2, work={"a": 1}))
    assert refused.error is not None and "max_model_len" in refused.error


def test_details_describe_the_worker(runner: ModelRunner) -> None:
    details = runner.details()
    assert (details.num_kv_blocks, details.block_size, details.vocab_size) == (128, 4, 2048)
    assert details.device == "cpu" and details.max_model_len == 4096
    assert set(details.eos_token_ids) == {0, 2}


def _sample_run(
    runner: ModelRunner, others: int, preempt_at: int | None = None
) -> list[int]:
    runner.reset()
    engine = LocalEngine(runner, chunk_size=5, token_budget=24, block_order_seed=others)
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234)
    engine.add("seeded", list(range(40, 52)), seeded)
    for i in range(others):
        engine.add(f"other{i}", list(range(i, i + 3 + 4 * i)),
                   SamplingParams(max_tokens=10, temperature=1.0))
    while engine.has_work:
        engine.step()
        if preempt_at is not None and len(engine.outputs["seeded"]) == preempt_at:
            engine.preempt("seeded")
            preempt_at = None
    return engine.outputs["seeded"]


def test_seeded_sampling_is_independent_of_batch_and_preemption(runner: ModelRunner) -> None:
    alone = _sample_run(runner, others=0)
    assert len(alone) == 10
    assert _sample_run(runner, others=5) == alone
    assert _sample_run(runner, others=3, preempt_at=4) == alone


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton")


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cpu-kernels", marks=pytest.mark.skipif(
        not INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_a_step_launched_before_the_last_is_collected_feeds_its_tokens(device: str) -> None:
    """The worker launches step N+1 before it collects step N: N+1's decodes take
    N's tokens on the device. The tokens equal strictly sequential execution."""
    outputs = []
    for overlapped in (False, True):
        runner = ModelRunner(ensure_embedded_model(), device.removesuffix("-kernels"), "float32",
                             num_kv_blocks=64, block_size=4,
                             kernels=True if device == "cpu-kernels" else None)
        plans = [plan(1, new=[new("a", [5, 6, 7, 8, 9]), new("b", [3, 4])],
                      work={"a": 5, "b": 2}, owners=[0, 0, 1], blocks=[10, 11, 20])]
        plans += [plan(step, work={"a": 1, "b": 1}, owners=[0, 1], blocks=[30 + step, 45 + step])
                  for step in range(2, 8)]
        results = []
        if overlapped:
            launched = runner.launch(plans[0])
            for following in plans[1:]:
                next_launched = runner.launch(following)
                results.append(runner.collect(launched))
                launched = next_launched
            results.append(runner.collect(launched))
        else:
            results = [runner.execute(p) for p in plans]
        assert all(r.error is None for r in results), [r.error for r in results]
        outputs.append([(r.request_ids, unpack_i32(r.token_ids).tolist()) for r in results])
        assert all(-1 not in s.token_ids for s in runner.requests.values())
    assert outputs[0] == outputs[1]
