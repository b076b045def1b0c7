"""A step timeline: one JSON line per step planned and per step result, so an
operator can see batch sizes and tokens per step over time (what a profile
cannot show: whether the worker was fed well). Off unless ``step_log`` names a
file; the lines are small and written unbuffered by line, a few hundred a second.

    {"t": 12.3456, "event": "plan", "worker": "worker/0", "step": 7, "requests": 64,
     "tokens": 2048, "waiting": 120, "running": 64}
    {"t": 12.3581, "event": "result", "worker": "worker/0", "step": 7}
"""

from __future__ import annotations

import time
from typing import IO

import msgspec

from shared.protocol.envelope import unpack_i32
from shared.protocol.step import StepPlan


class StepLog:
    def __init__(self, path: str) -> None:
        self._file: IO[bytes] | None = open(path, "ab", buffering=0) if path else None  # noqa: SIM115
        self._encode = msgspec.json.Encoder().encode

    def planned(self, worker: str, plan: StepPlan, waiting: int, running: int) -> None:
        if self._file is None:
            return
        num_tokens = plan.batch.num_tokens
        tokens = sum(unpack_i32(num_tokens)) if len(num_tokens) % 4 == 0 else 0
        self._write({"t": round(time.monotonic(), 6), "event": "plan", "worker": worker,
                     "step": plan.step_id, "requests": len(plan.batch.request_ids),
                     "tokens": tokens, "waiting": waiting, "running": running})

    def result(self, worker: str, step_id: int) -> None:
        if self._file is not None:
            self._write({"t": round(time.monotonic(), 6), "event": "result", "worker": worker,
                         "step": step_id})

    def _write(self, line: dict[str, object]) -> None:
        assert self._file is not None
        self._file.write(self._encode(line) + b"\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
