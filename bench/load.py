"""The load shape: when each request is sent, and how many may be in flight.

Arrivals are a Poisson process at ``request_rate`` (exponential gaps), or, with
``burstiness`` != 1, a gamma process of the same mean rate (vLLM's knob: < 1 is
burstier, > 1 more even); ``inf`` sends everything at once. ``max_concurrency``
caps requests in flight: a request that arrives while the cap is reached waits
for a slot, and its clock (TTFT, E2E) starts when it is sent, as in vLLM, so the
figures describe the server, not the client's queue.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack

import anyio

from bench.progress import ProgressBar


def arrival_offsets(count: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the run's start at which each request arrives; the first at 0."""
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if math.isinf(request_rate):
        return [0.0] * count
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)  # gamma(k, theta) has mean k * theta
    offsets: list[float] = []
    now = 0.0
    for i in range(count):
        if i:
            now += rng.gammavariate(burstiness, scale)
        offsets.append(now)
    return offsets


async def run_load(
    send_one: Callable[[int, float], Awaitable[bool]],
    offsets: Sequence[float],
    max_concurrency: int | None,
    progress: ProgressBar,
) -> float:
    """Send request ``i`` at ``offsets[i]`` through ``send_one(i, run_start)``
    (True: it succeeded); returns the run's duration, first send to last answer.
    ``run_start`` is the ``perf_counter`` origin of the offsets."""
    limit = anyio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(index: int) -> None:
        async with AsyncExitStack() as stack:
            if limit is not None:
                await stack.enter_async_context(limit)
            ok = await send_one(index, start)
        progress.advance(ok)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for index, offset in enumerate(offsets):
            # The schedule is the load itself, so this is a timed wait, not a readiness poll.
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            tg.start_soon(one, index)
    duration = time.perf_counter() - start
    progress.close()
    return duration
