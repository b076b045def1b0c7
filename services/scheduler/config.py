from __future__ import annotations

import msgspec

ROUTING_MODES = ("prefix", "least-loaded", "round-robin")


class SchedulerConfig(msgspec.Struct, frozen=True):
    """scheduler settings (env MESHSERVE_<FIELD>)."""

    max_num_seqs: int = 256  # running requests per worker
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_prefill_chunk: int = 512  # longest prefill chunk of one request in one step
    max_waiting: int = 1024  # bounded queue; beyond it requests get HTTP 429
    # Prompt tokens the waiting queue may hold (4 bytes each here, more in the
    # tokenizer and api); a request past it gets HTTP 429 unless the queue is empty.
    max_waiting_tokens: int = 1 << 20
    max_model_len: int = 0  # 0: the worker's
    # Free KV blocks leased ahead from the KV manager; 0: enough for every step in
    # flight at a full token budget, at most 1/4 of the pool (worker_slot.lease_target).
    lease_blocks: int = 0
    # Steps planned ahead of each worker (it feeds decode inputs itself); 0: by the
    # worker's device, 4 on CUDA and 2 on the CPU (see scheduler/worker_slot.py).
    steps_in_flight: int = 0
    enable_prefix_caching: bool = True  # share cached KV blocks of equal prompt prefixes
    # swap: a preempted request's blocks go to the worker's host tier when it has
    # room (else recompute); recompute: always recompute.
    preemption_mode: str = "swap"
    # A JSON line per step planned and per result here (scheduler/step_log.py): the
    # step timeline. Empty: off.
    step_log: str = ""
    # Which worker a new request waits for (scheduler/placement.py): prefix (its
    # cached prefix against load), least-loaded, or round-robin.
    routing: str = "prefix"
    # prefix routing: a cached or queued prompt token on a worker is worth this many
    # tokens of load there (cost = load - weight x overlap).
    routing_prefix_weight: float = 2.0
    # prefix routing: once the most loaded worker is this many tokens of work ahead
    # of the least loaded one (and twice its load), new requests go least-loaded.
    routing_balance_tokens: int = 4096
    # Prefill/decode hand-offs (handoff.py): each side's deadline for one transfer.
    handoff_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("swap", "recompute"):
            raise ValueError(
                f"preemption_mode must be swap or recompute, not {self.preemption_mode!r}")
        if self.routing not in ROUTING_MODES:
            raise ValueError(
                f"routing must be one of {', '.join(ROUTING_MODES)}, not {self.routing!r}")
        if not self.routing_prefix_weight >= 0:
            raise ValueError(
                f"routing_prefix_weight must be >= 0, not {self.routing_prefix_weight!r}")
        if not self.handoff_timeout_s > 0:
            raise ValueError(f"handoff_timeout_s must be > 0, not {self.handoff_timeout_s!r}")
        if self.routing_balance_tokens < 0:
            raise ValueError(
                f"routing_balance_tokens must be >= 0, not {self.routing_balance_tokens!r}")
