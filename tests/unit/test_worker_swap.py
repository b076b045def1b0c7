"""The host tier on the real model: the scheduler preempts by swap, the real
KvManager sizes the host pool, and ``ModelRunner`` copies blocks device -> host ->
device. A swapped request must sample exactly as if it had never left (seeded
sampling at temperature 1 depends on every logit)."""

from __future__ import annotations

import pytest
import torch

from services.kvcache.manager import KvManager
from services.scheduler.scheduler import Scheduler
from services.worker.kv_cache import HostKVStore
from services.worker.runner import ModelRunner
from shared.embedded_model import ensure_embedded_model
from shared.protocol.envelope import pack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit
from tests.unit.test_scheduler_core import make_scheduler, run_until_idle, start

W = "worker/0"
# On CUDA the host tier is pinned memory copied on a side stream: the same tests
# run there when a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


def load(num_blocks: int, device: str) -> ModelRunner:
    return ModelRunner(ensure_embedded_model(), device, "float32", num_kv_blocks=num_blocks,
                       block_size=4)


@pytest.fixture(scope="module", params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def roomy(device: str) -> ModelRunner:
    return load(64, device)


@pytest.fixture(scope="module")
def cramped(device: str) -> ModelRunner:
    return load(12, device)


def generate(runner: ModelRunner, mode: str, host_blocks: int
             ) -> tuple[Scheduler, dict[str, list[int]]]:
    runner.reset()
    s = make_scheduler(lease_blocks=12, preemption_mode=mode)
    kv = KvManager(host_swap_gb=host_blocks * runner.kv_block_bytes / 1e9)
    start(s, kv, runner.details())
    for i in range(3):
        prompt = [(13 * i + 7 * j) % 500 + 3 for j in range(12)]
        sampling = SamplingParams(max_tokens=20, temperature=1.0, seed=7 + i, ignore_eos=True)
        s.submit(Submit(f"r{i}", pack_i32(prompt), sampling, DetokenizeSpec()), owner="t")
    done = run_until_idle(s, kv, runner)  # type: ignore[arg-type]
    assert kv.usage(W).used_blocks == 0 and kv.usage(W).host_used_blocks == 0
    return s, done


def test_swapped_requests_sample_as_if_never_preempted(
        roomy: ModelRunner, cramped: ModelRunner) -> None:
    calm, reference = generate(roomy, "swap", 64)
    assert calm.stats.num_preemptions == 0
    swapped, got = generate(cramped, "swap", 64)
    stats = swapped.stats
    assert stats.num_swap_outs > 0 and stats.num_swap_ins == stats.num_swap_outs
    assert stats.num_preemptions == stats.num_swap_outs  # no recompute at all
    assert got == reference
    assert cramped.host_cache.allocated_blocks > 0


def test_host_round_trip_preserves_every_layer(roomy: ModelRunner) -> None:
    cache = roomy.kv_cache
    host = HostKVStore(cache)
    host.resize(8)
    for layer in range(len(cache.k)):
        cache.k[layer][3].normal_()
        cache.v[layer][3].normal_()
    k = [t[3].clone() for t in cache.k]
    v = [t[3].clone() for t in cache.v]
    host.swap([3], [5], [], [])
    for layer in range(len(cache.k)):
        cache.k[layer][3].zero_()
        cache.v[layer][3].zero_()
    # Out and in within one call: the swap-out lands first.
    host.swap([3], [6], [5], [3])
    for layer in range(len(cache.k)):
        assert torch.equal(cache.k[layer][3], k[layer])
        assert torch.equal(cache.v[layer][3], v[layer])
    host.resize(6)  # shrinking keeps blocks below the new size
    host.swap([], [], [5], [9])
    assert all(torch.equal(cache.k[layer][9], k[layer]) for layer in range(len(cache.k)))


def test_inconsistent_swap_lists_are_refused(roomy: ModelRunner) -> None:
    from shared.protocol.step import StepPlan
    from shared.protocol.tables import BlockMoves

    roomy.reset()
    host_blocks = roomy.host_cache.num_blocks

    unknown = roomy.execute(StepPlan(1, swap_in=BlockMoves.pack({"ghost": ([0], [1])})))
    assert unknown.error is not None and "unknown request" in unknown.error
    beyond = roomy.execute(StepPlan(1, host_num_blocks=2, swap_out=BlockMoves(
        [], b"", pack_i32([0]), pack_i32([5]))))
    assert beyond.error is not None
    assert roomy.host_cache.num_blocks == host_blocks  # a refused plan changes nothing
