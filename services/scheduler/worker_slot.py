"""One worker as the scheduler sees it: its KV lease, host tier, waiting queue,
running requests and steps in flight. Pure."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from services.scheduler.block_lease import BlockLease
from services.scheduler.host_pool import HostPool
from services.scheduler.request import Request, RequestStatus
from services.scheduler.roles import hands_off
from services.scheduler.waiting_queue import WorkerQueue
from shared.protocol.common import WorkerDetails

# Steps planned ahead of a worker when the setting is 0 (auto). A GPU worker's
# steps take ~2-5 ms, so the scheduler's round trip must be hidden behind several:
# on an H200 (1B shape, 256 x 512/128 through the mesh) 2 gave 14.9k tok/s, 4
# 18.4k, 6 15.1k. A CPU worker's steps take tens of ms: more ahead would only make
# a new request wait behind planned steps.
AUTO_STEPS_AHEAD = {"cuda": 4, "cpu": 2}

LEASE_POOL_SHARE = 4  # auto leases at most 1/4 of a worker's pool (lease_target)


def steps_ahead(setting: int, details: WorkerDetails) -> int:
    """How many steps to keep in flight at a worker (``setting`` 0: by its device)."""
    if setting > 0:
        return setting
    return AUTO_STEPS_AHEAD.get(details.device.split(":")[0], 2)


def lease_target(setting: int, steps: int, step_tokens: int, details: WorkerDetails) -> int:
    """Free blocks to lease ahead for one worker (``setting`` 0: enough for every
    step in flight plus the one being planned at a full token budget). A smaller
    lease runs dry while steps are planned back to back, and the steps planned
    before the next grant arrives admit no new prompt. Auto leases at most a quarter
    of the pool: free blocks are leased from the evictable cached ones, so a lease as
    large as a small pool would evict every cached prefix (a 160-block CPU pool fell
    from 92% prefix hits to 38%)."""
    if setting > 0:
        return setting
    auto = (steps + 1) * -(-step_tokens // details.block_size)
    return max(1, min(auto, details.num_kv_blocks // LEASE_POOL_SHARE))


@dataclass(eq=False, slots=True)
class WorkerSlot:
    name: str
    details: WorkerDetails
    lease: BlockLease
    running: dict[str, Request] = field(default_factory=dict)  # admission order
    # Requests placed here (dispatch.py), swapped-out ones of this worker included.
    waiting: WorkerQueue = field(default_factory=WorkerQueue)
    # Its last admission pass left requests in its queue (no budget, seat or KV
    # room): another worker with an empty queue may take some (dispatch.rebalance).
    backlogged: bool = False
    # Prompt tokens its running requests had still to compute after its last plan:
    # placement reads it per request, so it is counted once per plan, not per read.
    prefill_owed: int = 0
    inflight: dict[int, list[Request]] = field(default_factory=dict)  # step id -> batch
    finished: list[str] = field(default_factory=list)  # to drop at the worker next step
    host: HostPool = field(default_factory=HostPool)
    swapped: dict[str, Request] = field(default_factory=dict)  # on this worker's host tier
    # (request, device blocks, host blocks) swap-outs for the next plan
    pending_swap_out: list[tuple[Request, list[int], list[int]]] = field(default_factory=list)
    host_freed_after_plan: list[int] = field(default_factory=list)  # swapped in this plan
    host_blocks_sent: int = -1  # host pool size the worker was last told
    # Requests handed to this worker whose K/V arrived (handoff.py): running here
    # already, registered with the worker in its next plan.
    arrivals: list[Request] = field(default_factory=list)

    def note_prefill_owed(self) -> None:
        """Recount ``prefill_owed`` (after a plan: only planning schedules tokens)."""
        self.prefill_owed = sum(max(0, len(r.prefill_ids) - r.num_scheduled)
                                for r in self.running.values())

    @property
    def max_total_len(self) -> int:
        capacity = self.details.num_kv_blocks * self.details.block_size
        return min(self.details.max_model_len, capacity)

    def admit(self, request: Request) -> None:
        """``request`` runs here from now on; the worker gets it as a new request
        (its tokens so far are what it prefills)."""
        request.status = RequestStatus.RUNNING
        request.worker = self.name
        request.prefill_ids = array("i", request.token_ids)
        request.max_total_len = self.max_total_len
        request.eos_token_ids = frozenset(self.details.eos_token_ids)
        request.sent_to_worker = True
        request.hands_off = hands_off(self, request)
        self.running[request.request_id] = request

    def host_num_blocks_news(self) -> int:
        """The host pool size if the worker has not been told it yet, else -1."""
        if self.host_blocks_sent == self.host.num_blocks:
            return -1
        self.host_blocks_sent = self.host.num_blocks
        return self.host_blocks_sent
