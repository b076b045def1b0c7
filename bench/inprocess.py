"""The same engine as the mesh, in one process and one thread: the baseline the
mesh benchmark compares against.

It wires the real pure parts together — ``Scheduler`` (continuous batching),
``KvManager`` (block pools) and ``ModelRunner`` (the model) — with direct calls
where the mesh has sockets. Whatever the mesh loses to it is the cost of the mesh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.kvcache.manager import KvManager
from services.scheduler.config import SchedulerConfig
from services.scheduler.scheduler import Scheduler
from services.worker.runner import ModelRunner
from shared.protocol.envelope import pack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit

WORKER = "worker/0"


@dataclass
class Completion:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None


class InProcessEngine:
    def __init__(self, runner: ModelRunner, config: SchedulerConfig | None = None) -> None:
        self.runner = runner
        self.kv = KvManager()
        self.scheduler = Scheduler(config or SchedulerConfig())
        pool = self.scheduler.add_worker(WORKER, runner.details())
        self.scheduler.on_lease(self.kv.open_pool(pool))

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Run every prompt to completion, all submitted at once."""
        completions = {f"r{i}": Completion(f"r{i}") for i in range(len(prompts))}
        for (request_id, _), prompt in zip(completions.items(), prompts, strict=True):
            self.scheduler.submit(
                Submit(request_id, pack_i32(prompt), sampling, DetokenizeSpec()), owner="bench"
            )
        slot = self.scheduler.workers[WORKER]
        while len([c for c in completions.values() if c.finish_reason]) < len(completions):
            plan = self.scheduler.plan(WORKER)
            sync = slot.lease.sync_message()
            if sync is not None:
                self.scheduler.on_lease(self.kv.sync(sync))
            if plan is None:
                if not slot.inflight:
                    raise RuntimeError("the scheduler stalled with requests unfinished")
                continue
            self.scheduler.on_result(WORKER, self.runner.execute(plan))
            outputs, failures = self.scheduler.take_outputs()
            if failures:
                raise RuntimeError(f"requests failed: {failures}")
            now = time.perf_counter()
            for output in outputs:
                completion = completions[output.request.request_id]
                if output.token_ids and completion.first_token_at is None:
                    completion.first_token_at = now
                completion.token_ids.extend(output.token_ids)
                if output.finish_reason:
                    completion.finish_reason = output.finish_reason
                    completion.finished_at = now
        return list(completions.values())
