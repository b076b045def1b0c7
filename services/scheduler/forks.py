"""n > 1: one Submit becomes the choices ``<id>-<i>``, which share the prompt's
blocks copy-on-write. Pure.

Choice 0 (the leader) is queued and computes the prompt; the others wait in its
``pending_forks``, outside the waiting queue. When the leader's whole prompt is
scheduled, each fork takes over the leader's block table, all of it, the partial
last block included (one ref-count increment per block, done once per fork: nothing
here scans the cache), and starts at the prompt's last token, whose logits it needs
for its own first sample. Whoever is about to write into a block that another live
request holds (ref count > 1) gets a fresh block instead, and the plan tells the
worker to copy the shared one into it first (``StepPlan.copies``). With n choices
that is n - 1 copies of the prompt's last block, whatever the prompt length; every
other prompt block stays shared until the choices end.

    leader  [b0 b1 b2*]        b2* partial, ref 3     step N: prompt computed
    fork 1  [b0 b1 b2*]  ─▶  [b0 b1 c1]  copy b2 -> c1 step N+1, before compute
    fork 2  [b0 b1 b2*]  ─▶  [b0 b1 c2]  copy b2 -> c2 (leader then writes b2 alone)
"""

from __future__ import annotations

from services.scheduler.request import Request
from services.scheduler.stats import SchedulerStats
from services.scheduler.worker_slot import WorkerSlot


class ChoiceGroups:
    """The choices of each live n > 1 Submit, by the Submit's request id."""

    def __init__(self) -> None:
        self._groups: dict[str, list[Request]] = {}

    def __contains__(self, submit_id: str) -> bool:
        return submit_id in self._groups

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, submit_id: str, choices: list[Request]) -> None:
        self._groups[submit_id] = choices
        leader = choices[0]
        leader.pending_forks = choices[1:]
        for fork in leader.pending_forks:
            fork.fork_pending = True

    def get(self, submit_id: str) -> list[Request]:
        return self._groups.get(submit_id, [])

    def on_finished(self, request: Request) -> Request | None:
        """``request`` ended. If it ended before its prompt was scheduled, the next
        live choice leads: that one is returned, to be queued."""
        leader = None
        if request.pending_forks:
            forks = [f for f in request.pending_forks if not f.status.finished]
            request.pending_forks = []
            if forks:
                leader, leader.pending_forks = forks[0], forks[1:]
                leader.fork_pending = False
        if request.group is not None:
            group = self._groups.get(request.group, [])
            if all(r.status.finished for r in group):
                self._groups.pop(request.group, None)
        return leader


def fork(slot: WorkerSlot, leader: Request, stats: SchedulerStats) -> list[Request]:
    """The leader's prompt is scheduled: its pending forks take over its block
    table (every block, the partial last one included) and start at the prompt's
    last token. Returns them; their tables reach the worker with their first step."""
    forks = [f for f in leader.pending_forks if not f.status.finished]
    leader.pending_forks = []
    for choice in forks:
        choice.fork_pending = False
        slot.admit(choice)
        choice.block_ids = list(leader.block_ids)
        slot.lease.share(choice.request_id, choice.block_ids)
        stats.fork_shared_blocks += len(choice.block_ids)
        choice.block_hashes = list(leader.block_hashes)
        choice.num_committed_blocks = leader.num_committed_blocks
        choice.num_scheduled = len(choice.prefill_ids) - 1
        choice.table_sent = False
    return forks
