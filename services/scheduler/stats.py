"""The scheduler's counters, reported in ``SchedulerStatus`` (``meshserve kv stats``,
the api's /metrics). Counted since the scheduler started."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class WorkerCounters:
    """One worker's share (by worker name: a restarted worker keeps counting)."""

    prefix_cache_queries: int = 0  # prompt tokens looked up at admission here
    prefix_cache_hits: int = 0  # of those, found in this worker's cache
    requests_placed: int = 0  # new requests placement put on this worker's queue
    rebalanced_in: int = 0  # waiting requests this worker took from a backlogged peer
    # Prefill/decode hand-offs (handoff.py) this worker sent or received, by outcome,
    # and the bytes its own side reported moved.
    transfers_completed: int = 0
    transfers_failed: int = 0
    transfer_bytes: int = 0


@dataclass(slots=True)
class SchedulerStats:
    num_preemptions: int = 0  # by swap and by recompute
    prefix_cache_queries: int = 0  # prompt tokens looked up (vLLM counts tokens)
    prefix_cache_hits: int = 0  # of those, found cached
    fork_shared_blocks: int = 0  # blocks forks took over from their leader
    cow_block_copies: int = 0  # blocks copied because a fork wrote a shared one
    num_swap_outs: int = 0  # preemptions by swap (requests)
    num_swap_ins: int = 0
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    swap_fallbacks: int = 0  # swapped requests sent to recompute by a host shrink
    per_worker: dict[str, WorkerCounters] = field(default_factory=dict)

    def worker(self, name: str) -> WorkerCounters:
        counters = self.per_worker.get(name)
        if counters is None:
            counters = self.per_worker[name] = WorkerCounters()
        return counters
