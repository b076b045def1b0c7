"""Prefill/decode roles and the hand-off (services/scheduler/roles.py, handoff.py),
driven synchronously with the real KvManager, one bookkeeping worker per worker
(it checks that every position a step reads holds the reading request's own
prefix), and a transfer player that moves the bookkeeping K/V between workers and
answers each side's ``KvTransferDone`` the way the engines do. After every case the
blocks balance: nothing held in either pool, no transfer left."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import pytest

from services.kvcache.manager import KvManager
from services.scheduler.request import RequestStatus
from services.scheduler.scheduler import Scheduler
from shared.protocol.common import WorkerDetails
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit
from shared.protocol.kv import KvPoolClose
from shared.protocol.step import StepResult
from shared.protocol.transfer import (
    KvTransferCancel,
    KvTransferDone,
    KvTransferIn,
    KvTransferOut,
)
from tests.unit.test_scheduler_core import BookkeepingWorker, details, make_scheduler, start

P, D = "worker/0", "worker/1"
BLOCK = 4


def role_details(role: str, transfer: bool = True) -> WorkerDetails:
    return msgspec.structs.replace(details(), role=role,
                                   transfer_addr="ipc:///x/xfer.sock" if transfer else "")


def mesh(*roles: str, **overrides: int | bool | str) -> tuple[Scheduler, KvManager]:
    s, kv = make_scheduler(**overrides), KvManager()
    for i, role in enumerate(roles):
        start(s, kv, role_details(role), name=f"worker/{i}")
    return s, kv


def submit(s: Scheduler, rid: str, prompt: int = 9, max_tokens: int = 5, n: int = 1,
           prompt_logprobs: int = -1) -> None:
    first = 10 + 7 * len(s.requests)
    s.submit(Submit(rid, pack_i32(range(first, first + prompt)),
                    SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                   prompt_logprobs=prompt_logprobs),
                    DetokenizeSpec(), n=n), owner="tokenizer/0")


def expected(max_tokens: int) -> list[int]:
    return [100 + k for k in range(max_tokens)]


@dataclass
class TransferPlayer:
    """Plays both workers' transfer engines: once both commands of an id are in, the
    K/V move (bookkeeping slots, block for block) and both sides report ok.
    ``fail`` makes one side report a failure instead; ``hold`` keeps every transfer
    pending; a cancel of a pending side answers ``cancelled`` at once."""

    workers: dict[str, BookkeepingWorker]
    fail: str = ""  # "sender" | "receiver"
    hold: bool = False
    sides: dict[str, dict[str, object]] = field(default_factory=dict)  # id -> worker -> cmd
    reports: list[tuple[str, KvTransferDone]] = field(default_factory=list)
    commands_seen: list[str] = field(default_factory=list)

    def take(self, s: Scheduler) -> None:
        for c in s.handoffs.commands:
            self.commands_seen.append(type(c.command).__name__)
            match c.command:
                case KvTransferIn() | KvTransferOut() as cmd:
                    self.sides.setdefault(cmd.transfer_id, {})[c.worker] = cmd
                case KvTransferCancel(transfer_id=tid):
                    if self.sides.get(tid, {}).pop(c.worker, None) is not None:
                        self.reports.append((c.worker, KvTransferDone(
                            tid, False, error="cancelled", state="cancelled")))
                    if not self.sides.get(tid, True):
                        del self.sides[tid]
        s.handoffs.commands.clear()
        if not self.hold:
            for tid, sides in list(self.sides.items()):
                if len(sides) == 2:
                    self._move(tid, sides)

    def _move(self, tid: str, sides: dict[str, object]) -> None:
        (src, out), = [(w, c) for w, c in sides.items() if isinstance(c, KvTransferOut)]
        (dst, inn), = [(w, c) for w, c in sides.items() if isinstance(c, KvTransferIn)]
        del self.sides[tid]
        a, b = self.workers[src], self.workers[dst]
        for sb, db in zip(unpack_i32(out.blocks), unpack_i32(inn.blocks), strict=True):
            for off in range(BLOCK):
                key = a.slots.get(sb * BLOCK + off)
                if key is None:
                    b.slots.pop(db * BLOCK + off, None)
                else:
                    b.slots[db * BLOCK + off] = key
        size = len(unpack_i32(inn.blocks)) * 1000
        self.reports.append((src, KvTransferDone(tid, self.fail != "sender", size,
                                                 error="boom" if self.fail == "sender" else "")))
        self.reports.append((dst, KvTransferDone(tid, self.fail != "receiver", size,
                                                 error="boom" if self.fail == "receiver" else "")))

    def deliver(self, s: Scheduler) -> None:
        reports, self.reports = self.reports, []
        for worker, done in reports:
            s.handoffs.on_done(worker, done)


@dataclass
class Run:
    s: Scheduler
    kv: KvManager
    workers: dict[str, BookkeepingWorker]
    player: TransferPlayer
    pending: dict[str, list[StepResult]] = field(default_factory=dict)
    produced: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, str] = field(default_factory=dict)
    computed_on: dict[str, int] = field(default_factory=dict)  # worker -> tokens computed

    @classmethod
    def of(cls, s: Scheduler, kv: KvManager) -> Run:
        workers = {n: BookkeepingWorker(block_size=BLOCK) for n in s.workers}
        return cls(s, kv, workers, TransferPlayer(workers), {n: [] for n in s.workers})

    def round(self) -> bool:
        """One plan/execute/result pass over every worker, then the transfers.
        Returns whether anything is still going on."""
        busy = False
        for name in list(self.s.workers):
            while (plan := self.s.plan(name)) is not None:
                num_tokens, _ = plan.batch.unpack()
                self.computed_on[name] = self.computed_on.get(name, 0) + sum(num_tokens)
                self.pending[name].append(self.workers[name].execute(plan))
            sync = self.s.workers[name].lease.sync_message()
            if sync is not None:
                self.s.on_lease(self.kv.sync(sync))
            if self.pending[name]:
                self.s.on_result(name, self.pending[name].pop(0))
            busy |= bool(self.pending[name] or sync is not None or self.s.has_work(name))
        self.player.take(self.s)
        self.player.deliver(self.s)
        self.player.take(self.s)  # cancels the reports caused
        outputs, failures = self.s.take_outputs()
        assert not failures
        for out in outputs:
            self.produced.setdefault(out.request.request_id, []).extend(out.token_ids)
            if out.finish_reason:
                self.finish[out.request.request_id] = out.finish_reason
        return busy or any(map(self.s.has_work, self.s.workers)) or bool(
            self.s.handoffs.live or self.player.sides or self.player.reports)

    def until_idle(self, rounds: int = 2_000) -> dict[str, list[int]]:
        for _ in range(rounds):
            if not self.round():
                break
        else:
            raise AssertionError("still busy")
        return {r: t for r, t in self.produced.items() if self.finish.get(r) != "abort"}

    def lose(self, name: str) -> None:
        self.s.remove_worker(name)
        self.kv.close_pool(KvPoolClose(pool_id=name))
        self.pending.pop(name, None)
        for sides in self.player.sides.values():  # its engine died with it
            sides.pop(name, None)

    def assert_balanced(self) -> None:
        for name in self.s.workers:  # what settling released reaches the KV manager
            sync = self.s.workers[name].lease.sync_message()
            if sync is not None:
                self.s.on_lease(self.kv.sync(sync))
        assert not self.s.requests and not self.s.handoffs.live
        assert self.s.num_waiting == 0 and self.s.waiting.tokens == 0
        for name in self.s.workers:
            assert self.kv.usage(name).used_blocks == 0, name
            assert not any(self.s.workers[name].lease.refs), name


def test_a_prefilled_request_decodes_on_the_decode_worker_token_exact() -> None:
    s, kv = mesh("prefill", "decode")
    for i in range(6):
        submit(s, f"r{i}", prompt=5 + 3 * i, max_tokens=2 + i)
    run = Run.of(s, kv)
    done = run.until_idle()
    assert done == {f"r{i}": expected(2 + i) for i in range(6)}
    # The prefill worker computed prompts only; every decode ran on the decode worker
    # (the bookkeeping worker there checked it read the transferred prefixes).
    assert run.computed_on[P] == sum(5 + 3 * i for i in range(6))
    assert run.computed_on[D] == sum(1 + i for i in range(6))
    for name in (P, D):
        counters = s.stats.worker(name)
        assert (counters.transfers_completed, counters.transfers_failed) == (6, 0)
        assert counters.transfer_bytes > 0
    assert run.player.commands_seen.count("KvTransferCancel") == 0
    run.assert_balanced()


def test_a_first_token_that_finishes_the_request_is_never_handed_off() -> None:
    s, kv = mesh("prefill", "decode")
    submit(s, "one", max_tokens=1)
    run = Run.of(s, kv)
    assert run.until_idle() == {"one": expected(1)}
    assert not run.player.commands_seen and D not in run.computed_on
    run.assert_balanced()


@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_a_failed_side_cancels_nothing_leaks_and_the_request_is_recomputed(side: str) -> None:
    s, kv = mesh("prefill", "decode")
    for i in range(3):
        submit(s, f"r{i}", prompt=7 + i, max_tokens=4)
    run = Run.of(s, kv)
    run.player.fail = side
    done = run.until_idle()
    assert done == {f"r{i}": expected(4) for i in range(3)}
    assert s.stats.worker(P).transfers_failed == 3 and s.stats.worker(D).transfers_failed == 3
    assert s.stats.worker(D).transfers_completed == 0
    # Recomputed on the prefill worker, where they then decode (no second hand-off).
    assert D not in run.computed_on
    # The recompute found the prompts' full blocks still cached on the prefill worker.
    assert s.stats.worker(P).prefix_cache_hits > 0
    run.assert_balanced()


def hold_mid_transfer(run: Run) -> str:
    """Rounds until a transfer is in flight, held there. Its id."""
    run.player.hold = True
    for _ in range(100):
        run.round()
        if run.s.handoffs.live:
            (transfer_id,) = run.s.handoffs.live
            transfer = run.s.handoffs.live[transfer_id]
            assert transfer.request.status == RequestStatus.TRANSFERRING
            assert transfer.request.request_id not in run.s.workers[P].running
            return transfer_id
    raise AssertionError("no hand-off started")


@pytest.mark.parametrize("lost", [P, D])
def test_losing_either_worker_mid_transfer_recomputes_and_leaks_nothing(lost: str) -> None:
    s, kv = mesh("prefill", "decode")
    submit(s, "a", prompt=10, max_tokens=6)
    run = Run.of(s, kv)
    hold_mid_transfer(run)
    run.lose(lost)
    run.player.hold = False
    # The survivor's side was cancelled; it answers, the transfer settles.
    assert run.until_idle() == {"a": expected(6)}
    survivor = D if lost == P else P
    assert s.stats.worker(survivor).transfers_failed == 1
    if lost == P:  # no prefill worker left: the decode worker takes new work
        assert run.computed_on[D] >= 10
    run.assert_balanced()


def test_an_abort_mid_transfer_cancels_both_sides_and_frees_both() -> None:
    s, kv = mesh("prefill", "decode")
    submit(s, "a", prompt=10, max_tokens=6)
    run = Run.of(s, kv)
    hold_mid_transfer(run)
    s.abort(["a"])
    run.player.hold = False
    run.until_idle()
    assert run.finish == {"a": "abort"}
    assert run.player.commands_seen.count("KvTransferCancel") == 2
    assert s.stats.worker(P).transfers_failed == 1
    run.assert_balanced()


def test_a_late_or_stray_report_changes_nothing() -> None:
    s, kv = mesh("prefill", "decode")
    submit(s, "a", prompt=10, max_tokens=3)
    run = Run.of(s, kv)
    transfer_id = hold_mid_transfer(run)
    assert not s.handoffs.on_done("worker/7", KvTransferDone(transfer_id, True))
    assert not s.handoffs.on_done(P, KvTransferDone("nope", True))
    run.player.hold = False
    assert run.until_idle() == {"a": expected(3)}
    assert not s.handoffs.on_done(D, KvTransferDone(transfer_id, True))
    run.assert_balanced()


def test_new_requests_go_to_prefill_workers_only_and_decode_workers_steal_none() -> None:
    s, kv = mesh("decode", "prefill", "both", routing="round-robin")
    for i in range(6):
        submit(s, f"r{i}")
    assert len(s.workers["worker/0"].waiting) == 0
    assert len(s.workers["worker/1"].waiting) == len(s.workers["worker/2"].waiting) == 3
    s.workers["worker/1"].backlogged = True
    assert not s.waiting.stealable(s.workers["worker/0"])
    assert s.waiting.rebalance(s.workers["worker/0"], 8) == 0
    run = Run.of(s, kv)
    assert run.until_idle() == {f"r{i}": expected(5) for i in range(6)}
    # The prefill worker's requests decoded elsewhere; the both worker's stayed.
    assert s.stats.worker("worker/1").transfers_completed == 3
    run.assert_balanced()


def test_with_no_decode_worker_a_prefill_worker_decodes_itself() -> None:
    s, kv = mesh("prefill")
    submit(s, "a", max_tokens=4)
    run = Run.of(s, kv)
    assert run.until_idle() == {"a": expected(4)}
    assert not run.player.commands_seen
    run.assert_balanced()


def test_with_only_decode_workers_new_requests_still_run() -> None:
    s, kv = mesh("decode")
    submit(s, "a", max_tokens=4)
    assert Run.of(s, kv).until_idle() == {"a": expected(4)}


@pytest.mark.parametrize("sampling", [{"n": 2}, {"prompt_logprobs": 1}])
def test_n_choices_and_prompt_logprobs_stay_on_their_prefill_worker(
        sampling: dict[str, int]) -> None:
    s, kv = mesh("prefill", "decode")
    submit(s, "a", max_tokens=3, **sampling)
    run = Run.of(s, kv)
    run.until_idle()
    assert not run.player.commands_seen and D not in run.computed_on
    run.assert_balanced()


def test_a_short_decode_lease_makes_the_request_wait_not_decode_here() -> None:
    s, kv = mesh("prefill", "decode", lease_blocks=2)
    submit(s, "a", prompt=20, max_tokens=4)  # 5 blocks: more than the lease holds
    run = Run.of(s, kv)
    assert run.until_idle() == {"a": expected(4)}
    assert s.stats.worker(D).transfers_completed == 1
    assert run.computed_on[P] == 20
    run.assert_balanced()


def test_a_kv_manager_restart_mid_transfer_hears_of_both_sides_blocks() -> None:
    s, kv = mesh("prefill", "decode")
    submit(s, "a", prompt=10, max_tokens=4)
    run = Run.of(s, kv)
    transfer_id = hold_mid_transfer(run)
    transfer = s.handoffs.live[transfer_id]
    run.kv = KvManager()
    for message in s.reopen_pools():
        s.on_lease(run.kv.open_pool(message))
    # The new pools count the transfer's blocks as held: none can be leased away.
    assert run.kv.usage(P).used_blocks == len(transfer.source_blocks)
    assert run.kv.usage(D).used_blocks == len(transfer.dest_blocks)
    run.player.hold = False
    assert run.until_idle() == {"a": expected(4)}
    run.assert_balanced()


def test_hand_offs_wait_for_a_running_seat_on_the_decode_worker() -> None:
    s, kv = mesh("prefill", "decode", max_num_seqs=2)
    for i in range(5):
        submit(s, f"r{i}", prompt=6, max_tokens=6)
    run = Run.of(s, kv)
    most = 0
    while run.round():
        arriving = sum(t.dest == D for t in s.handoffs.live.values())
        most = max(most, len(s.workers[D].running) + arriving)
    assert most == 2
    assert {r: t for r, t in run.produced.items()} == {f"r{i}": expected(6) for i in range(5)}
    assert s.stats.worker(D).transfers_completed == 5
    run.assert_balanced()
