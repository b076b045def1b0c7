"""Preemption by swap to the host tier, driven synchronously with the real KvManager
and a bookkeeping worker that also plays the host tier: swapped-out blocks keep
the prefix keys of their K/V, so a request swapped back in reads exactly what it
wrote (the bookkeeper checks every position a step reads)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.kvcache.manager import KvManager
from services.scheduler.request import RequestStatus
from services.scheduler.scheduler import Scheduler
from shared.protocol.common import WorkerDetails
from shared.protocol.kv import KvDumpRequest, KvSetHostSwap
from shared.protocol.step import StepPlan, StepResult
from tests.unit.test_scheduler_core import (
    EOS,
    BookkeepingWorker,
    make_scheduler,
    run_until_idle,
    start,
    submit,
)

W = "worker/0"
BLOCK_BYTES = 1000


def swap_details(num_blocks: int = 12) -> WorkerDetails:
    return WorkerDetails(model="m", num_kv_blocks=num_blocks, block_size=4, max_model_len=256,
                         vocab_size=1000, eos_token_ids=[EOS], device="cpu",
                         kv_block_bytes=BLOCK_BYTES)


def gb_for(host_blocks: int) -> float:
    return host_blocks * BLOCK_BYTES / 1e9


@dataclass
class SwappingWorker(BookkeepingWorker):
    """The bookkeeper plus a host tier: swap-outs move slot keys device -> host and
    empty the table, swap-ins move them back into the new blocks, which become the
    request's table. Registrations are counted: a swapped request is never
    registered again (recompute would)."""

    host: dict[int, int] = field(default_factory=dict)  # flat host slot -> prefix key
    host_num_blocks: int = 0
    registrations: int = 0
    swapped_out: int = 0
    swapped_in: int = 0

    def _move(self, src_slots: dict[int, int], dst_slots: dict[int, int],
              src: int, dst: int) -> None:
        for offset in range(self.block_size):
            key = src_slots.get(src * self.block_size + offset)
            if key is None:
                dst_slots.pop(dst * self.block_size + offset, None)
            else:
                dst_slots[dst * self.block_size + offset] = key

    def execute(self, plan: StepPlan) -> StepResult:
        self.registrations += len(plan.new)
        if plan.host_num_blocks >= 0:
            self.host_num_blocks = plan.host_num_blocks
        for rid, (sources, targets) in plan.swap_out.unpack("swap_out").items():
            assert rid in self.tokens, "swapping out an unknown request"
            for src, dst in zip(sources, targets, strict=True):
                assert 0 <= dst < self.host_num_blocks, "host block beyond the host tier"
                assert src in self.blocks[rid], "swapping out a block the request does not hold"
                self._move(self.slots, self.host, src, dst)
            self.blocks[rid] = []
            self.swapped_out += 1
        tables: dict[str, list[int]] = {}
        for rid, (sources, targets) in plan.swap_in.unpack("swap_in").items():
            for src, dst in zip(sources, targets, strict=True):
                assert 0 <= src < self.host_num_blocks, "host block beyond the host tier"
                self._move(self.host, self.slots, src, dst)
            tables[rid] = targets
        for rid, table in tables.items():
            assert rid in self.tokens and self.blocks[rid] == [], "swap-in of a live table"
            self.blocks[rid] = table
            self.swapped_in += 1
        return super().execute(plan)


def expected(n: int, max_tokens: int) -> dict[str, list[int]]:
    return {f"r{i}": [100 + k for k in range(max_tokens)] for i in range(n)}


def crowded(mode: str = "swap", host_blocks: int = 64,
            caching: bool = True) -> tuple[Scheduler, KvManager]:
    # 12 blocks of 4 tokens: three requests of 12 prompt + 20 outputs cannot all fit.
    s = make_scheduler(lease_blocks=12, preemption_mode=mode, enable_prefix_caching=caching)
    kv = KvManager(host_swap_gb=gb_for(host_blocks))
    start(s, kv, swap_details())
    for i in range(3):
        submit(s, f"r{i}", prompt_len=12, max_tokens=20)
    return s, kv


@pytest.mark.parametrize("caching", [True, False])
def test_swap_preemption_resumes_without_recompute(caching: bool) -> None:
    s, kv = crowded(caching=caching)
    worker = SwappingWorker(block_size=4)
    done = run_until_idle(s, kv, worker)
    assert done == expected(3, 20)
    assert s.stats.num_swap_outs > 0 and s.stats.num_swap_ins == s.stats.num_swap_outs
    assert worker.swapped_out == worker.swapped_in == s.stats.num_swap_outs
    assert s.stats.num_preemptions == s.stats.num_swap_outs
    assert worker.registrations == 3  # nobody was recomputed
    assert s.stats.swapped_out_blocks == s.stats.swapped_in_blocks > 0
    assert kv.usage(W).used_blocks == 0 and kv.usage(W).host_used_blocks == 0
    assert s.workers[W].host.used_blocks == 0 and s.workers[W].host.num_blocks == 64


def test_recompute_mode_never_swaps() -> None:
    s, kv = crowded(mode="recompute")
    worker = SwappingWorker(block_size=4)
    assert run_until_idle(s, kv, worker) == expected(3, 20)
    assert s.stats.num_preemptions > 0 and s.stats.num_swap_outs == 0 and worker.swapped_out == 0
    assert worker.registrations > 3


def test_no_host_room_falls_back_to_recompute() -> None:
    s, kv = crowded(host_blocks=2)  # no victim's table fits in 2 host blocks
    worker = SwappingWorker(block_size=4)
    assert run_until_idle(s, kv, worker) == expected(3, 20)
    assert s.stats.num_preemptions > 0 and s.stats.num_swap_outs == 0


def drive_until(s: Scheduler, kv: KvManager, worker: BookkeepingWorker,
                condition: object, max_steps: int = 1000) -> dict[str, list[int]]:
    """Plan, execute and sync one step at a time until ``condition()`` holds."""
    produced: dict[str, list[int]] = {}
    for _ in range(max_steps):
        assert callable(condition)
        if condition():
            return produced
        plan = s.plan(W)
        if plan is not None:
            s.on_result(W, worker.execute(plan))
        sync = s.workers[W].lease.sync_message()
        if sync is not None:
            s.on_lease(kv.sync(sync))
        outputs, failures = s.take_outputs()
        assert not failures
        for out in outputs:
            produced.setdefault(out.request.request_id, []).extend(out.token_ids)
    raise AssertionError("condition never held")


def test_host_shrink_sends_swapped_requests_to_recompute() -> None:
    s, kv = crowded()
    worker = SwappingWorker(block_size=4)
    slot = s.workers[W]
    before = drive_until(s, kv, worker, lambda: bool(slot.swapped))
    swapped = list(slot.swapped)
    dump = kv.dump(KvDumpRequest(swapped[0]))
    assert dump.pool_id == W and {row.tier for row in dump.blocks} == {"host"}
    assert kv.usage(W).host_used_blocks == len(dump.blocks)
    stats, resizes = kv.set_host_swap(KvSetHostSwap(host_swap_gb=0.0))
    assert stats.pools[0].host_num_blocks == 0 and stats.pools[0].host_used_blocks == 0
    for resize in resizes:
        s.resize_host(resize)
    assert s.stats.swap_fallbacks == len(swapped) and not slot.swapped
    assert all(s.requests[r].status == RequestStatus.WAITING for r in swapped)
    after = run_until_idle(s, kv, worker)
    tokens = {r: before.get(r, []) + after.get(r, []) for r in after}
    assert tokens == expected(3, 20)
    assert worker.registrations > 3  # the fallen-back requests were registered again
    assert worker.host_num_blocks == 0 and slot.host.num_blocks == 0
    assert kv.usage(W).used_blocks == 0


def test_host_grow_at_run_time_enables_swapping() -> None:
    s, kv = crowded(host_blocks=0)
    stats, resizes = kv.set_host_swap(KvSetHostSwap(host_swap_gb=gb_for(64)))
    assert stats.pools[0].host_num_blocks == 64
    for resize in resizes:
        s.resize_host(resize)
    worker = SwappingWorker(block_size=4)
    assert run_until_idle(s, kv, worker) == expected(3, 20)
    assert s.stats.num_swap_outs > 0 and worker.registrations == 3


def test_abort_of_a_swapped_request_frees_its_host_blocks() -> None:
    s, kv = crowded()
    worker = SwappingWorker(block_size=4)
    slot = s.workers[W]
    drive_until(s, kv, worker, lambda: bool(slot.swapped))
    victim = next(iter(slot.swapped))
    s.abort([victim])
    assert slot.host.used_blocks == 0 and not slot.swapped
    done = run_until_idle(s, kv, worker)
    assert done[victim] == [] and len(done) == 3  # the abort itself ends it
    assert kv.usage(W).used_blocks == 0 and kv.usage(W).host_used_blocks == 0
