"""Copy-on-write forks on the real model: the scheduler plans, the real KvManager
keeps the pool, and ``ModelRunner`` copies shared blocks before it computes."""

from __future__ import annotations

import pytest
import torch

from services.kvcache.manager import KvManager
from services.scheduler.scheduler import Scheduler
from services.worker.runner import ModelRunner
from shared.embedded_model import ensure_embedded_model
from shared.protocol.envelope import pack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit
from tests.unit.test_scheduler_core import make_scheduler, run_until_idle, start

W = "worker/0"


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(ensure_embedded_model(), "cpu", "float32", num_kv_blocks=64, block_size=4)


def generate(runner: ModelRunner, prompt: list[int], n: int,
             sampling: SamplingParams) -> tuple[Scheduler, dict[str, list[int]]]:
    runner.reset()
    s, kv = make_scheduler(), KvManager()
    start(s, kv, runner.details())
    s.submit(Submit("r", pack_i32(prompt), sampling, DetokenizeSpec(), n=n), owner="t")
    done = run_until_idle(s, kv, runner)  # type: ignore[arg-type]
    assert kv.usage(W).used_blocks == 0
    return s, done


@pytest.mark.parametrize("prompt_len", [10, 12])
def test_greedy_forks_match_a_single_request(runner: ModelRunner, prompt_len: int) -> None:
    prompt = [(7 * i + 3) % 500 + 3 for i in range(prompt_len)]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    _, single = generate(runner, prompt, 1, greedy)
    s, forks = generate(runner, prompt, 3, greedy)
    assert forks == {f"r-{i}": single["r"] for i in range(3)}
    assert s.stats.cow_block_copies == 2


def test_seeded_forks_sample_like_separate_seeded_requests(runner: ModelRunner) -> None:
    prompt = [(11 * i + 5) % 500 + 3 for i in range(9)]
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=42, ignore_eos=True)
    _, forks = generate(runner, prompt, 3, seeded)
    for i in range(3):
        _, alone = generate(runner, prompt, 1, SamplingParams(
            max_tokens=8, temperature=1.0, seed=42 + i, ignore_eos=True))
        assert forks[f"r-{i}"] == alone["r"]


def test_copy_blocks_copies_every_layer(runner: ModelRunner) -> None:
    cache = runner.kv_cache
    for layer in range(len(cache.k)):
        cache.k[layer][5].fill_(float(layer + 1))
        cache.v[layer][5].fill_(-float(layer + 1))
    cache.copy_blocks([5], [9])
    for layer in range(len(cache.k)):
        assert torch.equal(cache.k[layer][9], cache.k[layer][5])
        assert torch.equal(cache.v[layer][9], cache.v[layer][5])
