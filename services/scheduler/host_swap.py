"""Preemption by swap: a victim's K/V go to its worker's host tier and come back
when it is admitted again. Pure.

Whenever ``preemption_mode = swap`` (the default) and the worker's host pool has
room for the victim's whole table (recompute otherwise), a victim whose steps have
drained is *swapped out*. The next plan to its worker carries the copies
(``StepPlan.swap_out``: device block -> host block; done before that step computes,
so its device blocks are free for anyone at once) and the worker keeps the request
registered with an empty table. The request waits in the queue (status SWAPPED,
still bound to its worker) with its computed state; when admitted again it gets
fresh device blocks and the plan carries ``swap_in`` (host -> device, the new blocks
becoming its whole table); then it continues where it stopped, nothing recomputed.
Host blocks a swap-in frees are reusable only after that plan, so no swap-out of
the same plan overwrites them before they are read. The KV manager sizes the host
pool (``KvLease.usage.host_num_blocks``, ``KvHostResize``); when it shrinks, swapped
requests holding a block beyond the new size fall back to recompute (the worker
drops their state; they re-enter as new requests).
"""

from __future__ import annotations

from services.scheduler.request import Request, RequestStatus
from services.scheduler.stats import SchedulerStats
from services.scheduler.step_builder import StepBuilder
from services.scheduler.worker_slot import WorkerSlot


def swap_out(slot: WorkerSlot, request: Request, stats: SchedulerStats) -> bool:
    """Swap the victim out if the host pool has room for its whole table; its
    device blocks are free at once (the copies run before the next step computes).
    False (nothing changed) otherwise."""
    if not request.block_ids:
        return False
    host = slot.host.take(len(request.block_ids))
    if host is None:
        return False
    device = request.block_ids
    slot.running.pop(request.request_id, None)
    slot.lease.release(request.request_id, device)
    slot.lease.host_hold(request.request_id, host)
    slot.pending_swap_out.append((request, device, host))
    slot.swapped[request.request_id] = request
    request.block_ids = []
    request.host_blocks = host
    request.status = RequestStatus.SWAPPED
    request.num_preemptions += 1
    stats.num_swap_outs += 1
    stats.swapped_out_blocks += len(device)
    return True


def swap_in(slot: WorkerSlot, request: Request, count: int, builder: StepBuilder,
            stats: SchedulerStats) -> list[int] | None:
    """Bring a swapped-out request back: fresh device blocks for its table (the
    plan copies its host blocks into them) plus what its next ``count`` tokens
    need, which are returned. None (nothing changed) when the lease is short."""
    lease = slot.lease
    table = len(request.host_blocks)
    needed = table + max(0, lease.blocks_for(request.num_scheduled + count) - table)
    blocks = lease.take(request.request_id, needed)
    if blocks is None:
        return None
    host = request.host_blocks
    request.host_blocks = []
    slot.swapped.pop(request.request_id, None)
    slot.host_freed_after_plan.extend(host)
    lease.host_release(request.request_id)
    request.status = RequestStatus.RUNNING
    request.block_ids = blocks[:table]
    request.table_sent = True  # the swap-in sends its whole table
    slot.running[request.request_id] = request
    builder.swap_in(request, host, blocks[:table])
    stats.num_swap_ins += 1
    stats.swapped_in_blocks += table
    return blocks[table:]


def drop_host(slot: WorkerSlot, request: Request) -> None:
    """Give up the request's host blocks (and a swap-out not sent yet)."""
    slot.swapped.pop(request.request_id, None)
    if not request.host_blocks:
        return
    slot.pending_swap_out = [e for e in slot.pending_swap_out if e[0] is not request]
    slot.host.free(request.host_blocks)
    slot.lease.host_release(request.request_id)
    request.host_blocks = []


def resize_host(slot: WorkerSlot, num_blocks: int, stats: SchedulerStats) -> None:
    """The KV manager sized this worker's host tier. Swapped requests holding a
    block beyond a smaller size fall back to recompute; their queue entries stay
    valid (they come back as new requests)."""
    size = max(0, num_blocks)
    for request in list(slot.swapped.values()):
        if request.host_blocks and max(request.host_blocks) >= size:
            drop_host(slot, request)
            slot.finished.append(request.request_id)  # the worker drops its state
            request.reset_for_recompute()
            stats.swap_fallbacks += 1
    held = [b for r in slot.swapped.values() for b in r.host_blocks]
    slot.host.resize(size, held + slot.host_freed_after_plan)
