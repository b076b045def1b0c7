"""The continuous-batching core, driven synchronously with the real KvManager and
a bookkeeping worker that plays the model (the style of vLLM's scheduler tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.kvcache.manager import KvManager
from services.scheduler.config import SchedulerConfig
from services.scheduler.scheduler import Scheduler
from services.scheduler.worker_slot import lease_target
from shared.protocol.common import WorkerDetails
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit
from shared.protocol.step import StepPlan, StepResult

EOS = 2


def make_scheduler(**overrides: int | bool) -> Scheduler:
    settings = {"max_num_batched_tokens": 64, "max_prefill_chunk": 32, "lease_blocks": 16}
    settings.update(overrides)
    return Scheduler(SchedulerConfig(**settings))


def details(num_blocks: int = 64, block_size: int = 4, max_len: int = 256) -> WorkerDetails:
    return WorkerDetails(model="m", num_kv_blocks=num_blocks, block_size=block_size,
                         max_model_len=max_len, vocab_size=1000, eos_token_ids=[EOS],
                         device="cpu")


def submit(s: Scheduler, rid: str, prompt_len: int, max_tokens: int = 4, priority: int = 0,
           owner: str = "tokenizer/0") -> None:
    s.submit(Submit(rid, pack_i32(range(10, 10 + prompt_len)),
                    SamplingParams(max_tokens=max_tokens, temperature=0.0),
                    DetokenizeSpec(), priority=priority), owner=owner)


def prefix_keys(tokens: list[int]) -> list[int]:
    """keys[p] identifies tokens[:p + 1]: what the K/V at position p depend on."""
    keys, key = [], 0
    for token in tokens:
        key = hash((key, token))
        keys.append(key)
    return keys


@dataclass
class BookkeepingWorker:
    """Checks every plan the way a worker would and samples token 100 + k (k = the
    request's output index), or EOS at ``eos_at`` outputs.

    It also plays the KV cache: each slot it "writes" remembers which token prefix
    its K/V would come from, and every position a step reads (a prefix-cache hit, a
    chunk's context) must hold the reading request's own prefix."""

    block_size: int
    eos_at: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, list[int]] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    slots: dict[int, int] = field(default_factory=dict)  # flat slot -> prefix key
    cached_tokens: int = 0  # positions skipped thanks to num_computed_tokens
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks

    def slot(self, rid: str, position: int) -> int:
        block = self.blocks[rid][position // self.block_size]
        return block * self.block_size + position % self.block_size

    def execute(self, plan: StepPlan) -> StepResult:
        self._register(plan)
        num_tokens = self._apply_tables(plan)
        counts = list(zip(plan.batch.request_ids, num_tokens, strict=True))
        self._write_then_read(counts)
        return self._sample(plan.step_id, counts)

    def _register(self, plan: StepPlan) -> None:
        for rid in plan.finished:
            for table in (self.tokens, self.computed, self.outputs, self.blocks, self.seeds):
                table.pop(rid, None)
        for new in plan.new:
            assert new.request_id not in self.tokens, "registered twice"
            self.tokens[new.request_id] = list(unpack_i32(new.token_ids))
            self.computed[new.request_id] = new.num_computed_tokens
            self.cached_tokens += new.num_computed_tokens
            self.outputs[new.request_id] = new.num_output_tokens
            self.blocks[new.request_id] = []
            self.seeds[new.request_id] = new.sampling.seed or 0

    def _apply_tables(self, plan: StepPlan) -> list[int]:
        """Apply the plan's table edits; returns each request's tokens to compute."""
        # The plan's parts in the order of its fields: replaces, copies, appends.
        for rid, edits in plan.replaces.unpack("replaces").items():
            for index, block in edits:
                self.blocks[rid][index] = block
        # Copy-on-write copies land before the step writes anything.
        for src, dst in zip(*plan.copies.unpack("copies"), strict=True):
            self.copies.append((src, dst))
            for offset in range(self.block_size):
                key = self.slots.get(src * self.block_size + offset)
                if key is None:
                    self.slots.pop(dst * self.block_size + offset, None)
                else:
                    self.slots[dst * self.block_size + offset] = key
        num_tokens, appends = plan.batch.unpack()
        for rid, blocks in zip(plan.batch.request_ids, appends, strict=True):
            self.blocks[rid].extend(blocks)
        return num_tokens

    def _write_then_read(self, counts: list[tuple[str, int]]) -> None:
        # A step writes every K/V before any attention reads (as the real worker).
        for rid, count in counts:
            start = self.computed[rid]
            assert start + count <= len(self.tokens[rid]), "computing unknown tokens"
            assert len(self.blocks[rid]) * self.block_size >= start + count, "no KV slot"
            keys = prefix_keys(self.tokens[rid][: start + count])
            for p in range(start, start + count):
                self.slots[self.slot(rid, p)] = keys[p]
        for rid, count in counts:
            end = self.computed[rid] + count
            keys = prefix_keys(self.tokens[rid][:end])
            for p in range(end):
                assert self.slots.get(self.slot(rid, p)) == keys[p], (
                    f"{rid} reads position {p} holding another prefix's K/V")

    def _sample(self, step_id: int, counts: list[tuple[str, int]]) -> StepResult:
        sampled_ids, sampled = [], []
        for rid, count in counts:
            self.computed[rid] += count
            if self.computed[rid] == len(self.tokens[rid]):
                k = self.outputs[rid]
                # Seeded requests (forks: seed + i) diverge, so a fork that wrote
                # into a block it shares would spoil its siblings' prefixes.
                token = EOS if self.eos_at.get(rid) == k else 100 + k + 50 * self.seeds[rid]
                self.tokens[rid].append(token)
                self.outputs[rid] += 1
                sampled_ids.append(rid)
                sampled.append(token)
        return StepResult(step_id, sampled_ids, pack_i32(sampled))


def run_until_idle(s: Scheduler, kv: KvManager, worker: BookkeepingWorker,
                   name: str = "worker/0", max_steps: int = 10_000) -> dict[str, list[int]]:
    """Drive plan -> execute -> result with steps kept in flight, like the actor."""
    produced: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    pending: list[StepResult] = []
    for _ in range(max_steps):
        while (plan := s.plan(name)) is not None:
            pending.append(worker.execute(plan))
        sync = s.workers[name].lease.sync_message()
        if sync is not None:
            s.on_lease(kv.sync(sync))
        if not pending:
            if not s.has_work(name) and sync is None:
                break
            continue
        s.on_result(name, pending.pop(0))
        outputs, failures = s.take_outputs()
        assert not failures
        for out in outputs:
            produced.setdefault(out.request.request_id, []).extend(out.token_ids)
            if out.finish_reason:
                finish[out.request.request_id] = out.finish_reason
    return {rid: toks for rid, toks in produced.items() if rid in finish}


def start(s: Scheduler, kv: KvManager, d: WorkerDetails, name: str = "worker/0") -> None:
    s.on_lease(kv.open_pool(s.add_worker(name, d)))


def test_requests_finish_with_all_tokens_and_no_block_leaks() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    for i in range(6):
        submit(s, f"r{i}", prompt_len=5 + 13 * i, max_tokens=3 + i)
    done = run_until_idle(s, kv, BookkeepingWorker(block_size=4))
    assert done == {f"r{i}": [100 + k for k in range(3 + i)] for i in range(6)}
    assert kv.usage("worker/0").used_blocks == 0
    assert not s.requests


def test_eos_stops_and_in_flight_token_is_discarded() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    submit(s, "a", prompt_len=3, max_tokens=50)
    done = run_until_idle(s, kv, BookkeepingWorker(block_size=4, eos_at={"a": 2}))
    assert done == {"a": [100, 101, EOS]}


def test_chunked_prefill_respects_budget_and_chunk() -> None:
    s, kv = make_scheduler(max_num_batched_tokens=40, max_prefill_chunk=16,
                           enable_prefix_caching=False), KvManager()
    start(s, kv, details())
    submit(s, "long", prompt_len=50)
    submit(s, "short", prompt_len=10)
    plan = s.plan("worker/0")
    assert plan is not None
    counts = dict(zip(plan.batch.request_ids, unpack_i32(plan.batch.num_tokens), strict=True))
    assert counts == {"long": 16, "short": 10}


def test_priority_then_fcfs_admission() -> None:
    s, kv = make_scheduler(max_num_seqs=1), KvManager()
    start(s, kv, details())
    submit(s, "late-low", prompt_len=4, priority=5)
    submit(s, "high", prompt_len=4, priority=0)
    submit(s, "high-2", prompt_len=4, priority=0)
    plan = s.plan("worker/0")
    assert plan is not None and plan.batch.request_ids == ["high"]


def test_queue_overflow_is_busy() -> None:
    s = make_scheduler(max_waiting=2)
    for i in range(3):
        submit(s, f"r{i}", prompt_len=4)
    _, failures = s.take_outputs()
    assert [f.failure.status for f in failures] == [429]
    assert failures[0].failure.request_id == "r2"


def test_abort_waiting_running_and_before_submit() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    submit(s, "run", prompt_len=8, max_tokens=100)
    plan = s.plan("worker/0")
    assert plan is not None and plan.batch.request_ids == ["run"]
    submit(s, "wait", prompt_len=4)
    s.abort(["run", "wait", "ghost"])
    s.abort(["run"])  # idempotent
    outputs, _ = s.take_outputs()
    assert sorted((o.request.request_id, o.finish_reason) for o in outputs) == [
        ("run", "abort"), ("wait", "abort")]
    submit(s, "ghost", prompt_len=4)  # the abort overtook its submit
    assert "ghost" not in s.requests
    nxt = s.plan("worker/0")
    assert nxt is not None and nxt.finished == ["run"] and nxt.batch.request_ids == []


def test_preemption_by_recompute_when_pool_is_exhausted() -> None:
    # 12 blocks of 4 tokens: three requests of 12 prompt + 20 outputs cannot all fit.
    s, kv = make_scheduler(lease_blocks=12), KvManager()
    start(s, kv, details(num_blocks=12))
    for i in range(3):
        submit(s, f"r{i}", prompt_len=12, max_tokens=20)
    done = run_until_idle(s, kv, BookkeepingWorker(block_size=4))
    assert done == {f"r{i}": [100 + k for k in range(20)] for i in range(3)}
    assert s.stats.num_preemptions > 0
    assert kv.usage("worker/0").used_blocks == 0


def test_lost_worker_requeues_its_requests() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details())
    submit(s, "a", prompt_len=6, max_tokens=5)
    assert s.plan("worker/0") is not None
    assert [r.request_id for r in s.remove_worker("worker/0")] == ["a"]
    start(s, kv, details(), name="worker/1")
    done = run_until_idle(s, kv, BookkeepingWorker(block_size=4), name="worker/1")
    assert done == {"a": [100 + k for k in range(5)]}


def test_prompt_too_long_is_rejected() -> None:
    s, kv = make_scheduler(), KvManager()
    start(s, kv, details(max_len=32))
    submit(s, "big", prompt_len=40)
    _, failures = s.take_outputs()
    assert failures[0].failure.status == 400


def test_the_auto_lease_leaves_most_of_a_small_pool_to_the_prefix_cache() -> None:
    # 3 steps ahead of 64-token steps in 4-token blocks: 64 blocks, all of a
    # 64-block pool; leased blocks are taken from the evictable cached ones.
    assert lease_target(0, 2, 64, details(num_blocks=64)) == 16
    assert lease_target(0, 2, 64, details(num_blocks=4096)) == 48  # a large pool: auto
    assert lease_target(10, 2, 64, details(num_blocks=64)) == 10  # a setting is a setting
