"""Placement: which worker a new request waits for. Pure, no I/O.

The scheduler places every new request on one worker's queue when it arrives
(dispatch.py); ``Placement.choose`` picks that worker among ``candidates``, a list
the caller filters (dispatch.py: prefill and both workers that fit the request;
handoff.py: decode and both workers) without the policy changing. Modes (``routing``):

- ``round-robin``: the candidates in turn (by name), blind to load and prefixes.
- ``least-loaded``: the smallest ``load``.
- ``prefix`` (default): the smallest ``cost = load - routing_prefix_weight x
  overlap``, where ``overlap`` is how many of the request's prompt tokens that
  worker would not compute: the longest prefix cached in its pool (the lease's
  mirror of the pool's prefix index: no round trip to the KV manager) or shared
  with a request already queued there (a burst sharing a prefix follows its first
  request before that one is computed: the index only learns of a block once it
  is scheduled). The default weight 2 counts a cached token once for the work it
  saves there and once for the work it would cost elsewhere (a second copy of the
  prefix, in a cache that then holds fewer other prefixes).

``load`` is a worker's work ahead in tokens: what its queue will compute (each
request's tokens less the prefix it found when queued), what its running requests
still owe of their prompts, and one decode token per running request. Tokens, not
requests, because a prefill of 400 tokens and one of 10 (a hit) are not the same
load; the decode term keeps a worker busy with many short requests from looking idle.

Ties, which are the rule while the workers are idle (light load: every load is 0):
prefix routing gives the request to the worker whose cache holds the fewest
blocks (cached, or queued to be), so new prefixes spread over the workers (SGLang
sends a request without a good match to the smallest tree); least-loaded takes the
tied workers in turn. Either way not every idle-time request lands on worker 0.

Balance (after SGLang's cache-aware router): a hot prefix would otherwise pull
every request onto the worker caching it. When the most loaded candidate is more
than ``routing_balance_tokens`` ahead of the least loaded one and over twice its
load, prefix routing places least-loaded until the gap closes. Rebalancing of
requests already queued is dispatch.py's part.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from services.scheduler.block_tables import prefix_hashes
from services.scheduler.config import SchedulerConfig
from services.scheduler.request import Request
from services.scheduler.worker_slot import WorkerSlot

# How much more loaded than the least loaded worker the most loaded one must be
# (as well as routing_balance_tokens ahead) before prefix routing yields to load.
BALANCE_RATIO = 2.0


def load(slot: WorkerSlot) -> int:
    """Tokens of work ahead of a new request on ``slot``."""
    return slot.waiting.work + slot.prefill_owed + len(slot.running)


def overlap_blocks(slot: WorkerSlot, hashes: list[int]) -> int:
    """Blocks of this prompt hash chain the worker would not compute: cached in its
    pool, or shared with a request queued there."""
    return max(len(slot.lease.lookup(hashes)), slot.waiting.queued_prefix(hashes))


class Placement:
    def __init__(self, mode: str = "prefix", prefix_weight: float = 2.0,
                 balance_tokens: int = 4096, prefix_caching: bool = True) -> None:
        self.mode = mode
        self.prefix_weight = prefix_weight
        self.balance_tokens = balance_tokens
        # Without prefix caching there is nothing to reuse: prefix is least-loaded.
        self.prefix_caching = prefix_caching
        self._turn = itertools.count()

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> Placement:
        return cls(config.routing, config.routing_prefix_weight, config.routing_balance_tokens,
                   config.enable_prefix_caching)

    def choose(self, request: Request, candidates: Sequence[WorkerSlot]) -> WorkerSlot | None:
        """The worker ``request`` should wait for, or None when there is no candidate."""
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda slot: slot.name)
        if self.mode == "round-robin":
            return ordered[next(self._turn) % len(ordered)]
        loads = [load(slot) for slot in ordered]
        if self.mode == "least-loaded" or not self.prefix_caching or self._imbalanced(loads):
            least = [slot for slot, n in zip(ordered, loads, strict=True) if n == min(loads)]
            return least[next(self._turn) % len(least)]
        costs = []
        for slot, slot_load in zip(ordered, loads, strict=True):
            hashes = prefix_hashes(request, slot.lease.block_size)
            overlap = overlap_blocks(slot, hashes) * slot.lease.block_size
            footprint = slot.lease.cached_blocks + slot.waiting.queued_blocks
            costs.append((slot_load - self.prefix_weight * overlap, slot_load, footprint))
        return ordered[costs.index(min(costs))]

    def _imbalanced(self, loads: list[int]) -> bool:
        most, least = max(loads), min(loads)
        return most - least > self.balance_tokens and most > BALANCE_RATIO * least

    def work(self, request: Request, slot: WorkerSlot) -> tuple[int, list[int]]:
        """What queueing ``request`` on ``slot`` adds to its load (its tokens less the
        prefix it finds there), and the prompt hashes its queue records."""
        if not self.prefix_caching:
            return len(request.token_ids), []
        hashes = prefix_hashes(request, slot.lease.block_size)
        saved = overlap_blocks(slot, hashes) * slot.lease.block_size
        return len(request.token_ids) - saved, hashes
