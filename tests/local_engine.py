"""``LocalEngine``: a minimal continuous-batching loop that drives a ``ModelRunner``
in process with real ``StepPlan``s: the plan source of the worker's tests.

It keeps the worker's tests independent of the real scheduler (whose plans the
mesh tests and ``bench/inprocess.py`` exercise), and adds what those tests need:
scattered block ids and preemption on demand. It speaks the same protocol the scheduler speaks
(new requests once, then deltas; block tables append-only; chunked prefill under
a per-step token budget) but keeps scheduling trivial: first come first served,
no prefix cache, no preemption under memory pressure (running out of blocks is an
error). Real scheduling lives in services/scheduler.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.worker.runner import ModelRunner
from services.worker.step_batch import blocks_for
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import SamplingParams
from shared.protocol.step import NewRequest, StepBatch, StepPlan, StepResult


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    outputs: list[int] = field(default_factory=list)
    num_computed: int = 0  # as planned: the worker has computed these once the step ran
    blocks: list[int] = field(default_factory=list)
    announced: bool = False  # its NewRequest went out

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.outputs)

    @property
    def done(self) -> bool:
        if len(self.outputs) >= self.sampling.max_tokens:
            return True
        return bool(self.outputs) and self.outputs[-1] in self.sampling.stop_token_ids


class BlocksExhaustedError(RuntimeError):
    pass


class LocalEngine:
    """Plans steps for the requests it was given until each has ``max_tokens``
    outputs (or sampled one of its ``stop_token_ids``)."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        chunk_size: int = 512,
        token_budget: int = 2048,
        max_running: int = 256,
        block_order_seed: int | None = None,
    ) -> None:
        self.runner = runner
        self.chunk_size = chunk_size
        self.token_budget = token_budget
        self.max_running = max_running
        free = list(range(runner.num_kv_blocks))
        if block_order_seed is not None:
            # Scattered block tables catch indexing bugs that contiguous ones hide.
            random.Random(block_order_seed).shuffle(free)
        self._free_blocks = deque(free)
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._finished_unsent: list[str] = []
        self.outputs: dict[str, list[int]] = {}
        self._step_id = 0

    def add(self, request_id: str, prompt: Iterable[int], sampling: SamplingParams) -> None:
        request = _Request(request_id, list(prompt), sampling)
        self.outputs[request_id] = request.outputs
        self._waiting.append(request)

    def preempt(self, request_id: str) -> None:
        """Recompute preemption: the worker drops the request and its blocks; it comes
        back later as a new request carrying its outputs so far."""
        request = self._running.pop(request_id)
        self._release(request)
        again = _Request(request_id, request.prompt, request.sampling, request.outputs)
        self._waiting.appendleft(again)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._finished_unsent)

    def next_plan(self) -> StepPlan:
        self._step_id += 1
        while self._waiting and len(self._running) < self.max_running:
            request = self._waiting.popleft()
            self._running[request.request_id] = request
        budget = self.token_budget
        new: list[NewRequest] = []
        request_ids: list[str] = []
        num_tokens: list[int] = []
        appends: list[list[int]] = []
        for request in self._running.values():
            count = min(request.num_tokens - request.num_computed, self.chunk_size, budget)
            if count <= 0:
                continue
            if not request.announced:
                request.announced = True
                tokens = request.prompt + request.outputs
                new.append(NewRequest(
                    request.request_id, pack_i32(tokens), len(request.outputs), request.sampling
                ))
            appended: list[int] = []
            appends.append(appended)
            request_ids.append(request.request_id)
            num_tokens.append(count)
            budget -= count
            request.num_computed += count
            for _ in range(blocks_for(request.num_computed, self.runner.block_size)
                           - len(request.blocks)):
                if not self._free_blocks:
                    raise BlocksExhaustedError("LocalEngine ran out of KV blocks")
                block = self._free_blocks.popleft()
                request.blocks.append(block)
                appended.append(block)
        finished, self._finished_unsent = self._finished_unsent, []
        return StepPlan(
            step_id=self._step_id,
            finished=finished,
            new=new,
            batch=StepBatch.pack(request_ids, num_tokens, appends),
        )

    def record(self, result: StepResult) -> None:
        if result.error is not None:
            raise RuntimeError(f"step {result.step_id} failed: {result.error}")
        for request_id, token in zip(
            result.request_ids, unpack_i32(result.token_ids), strict=True
        ):
            request = self._running[request_id]
            request.outputs.append(token)
            if request.done:
                del self._running[request_id]
                self._release(request)

    def step(self) -> StepResult:
        result = self.runner.execute(self.next_plan())
        self.record(result)
        return result

    def run(self) -> dict[str, list[int]]:
        """Step until every request is done; each request's output ids."""
        while self.has_work:
            self.step()
        return self.outputs

    def _release(self, request: _Request) -> None:
        self._finished_unsent.append(request.request_id)
        self._free_blocks.extend(request.blocks)
        request.blocks = []
