"""The lists of one step being planned, and the ``StepPlan`` they become. Pure.

The scheduler decides who runs; the builder records what the worker must be told
about it, in the plan's own terms (appends, copy-on-write copies and table
replaces, swap-ins, new requests), and packs it once at the end.
"""

from __future__ import annotations

from services.scheduler.request import Request
from shared.protocol.step import NewRequest, StepBatch, StepPlan
from shared.protocol.tables import BlockCopies, BlockMoves, BlockReplaces


class StepBuilder:
    def __init__(self) -> None:
        self.batch: list[Request] = []
        self._num_tokens: list[int] = []
        self._appends: list[list[int]] = []
        self._new: list[NewRequest] = []
        self._copies: list[tuple[int, int]] = []  # (shared block, its fresh copy)
        self._replaces: dict[str, list[tuple[int, int]]] = {}  # (table position, block)
        self._swap_in: dict[str, tuple[list[int], list[int]]] = {}  # (host, device)

    @property
    def num_tokens(self) -> int:
        return sum(self._num_tokens)

    def has_work(self) -> bool:
        # A registration alone is work too (a hand-off's arrival not scheduled yet).
        return bool(self.batch or self._swap_in or self._new)

    def schedule(self, request: Request, count: int, blocks: list[int],
                 copies: list[tuple[int, int, int]]) -> None:
        """``request`` computes ``count`` tokens, its table grows by ``blocks``, and
        ``copies`` (table position, shared block, fresh copy) were made in its table
        already. Call before the request's own table is extended."""
        self.batch.append(request)
        self._num_tokens.append(count)
        self._copies.extend((src, dst) for _, src, dst in copies)
        if request.table_sent:
            if copies:
                self._replaces[request.request_id] = [(p, dst) for p, _, dst in copies]
            self._appends.append(blocks)
        else:
            # A fork's first step: the worker gets its whole table (copies already
            # in place).
            self._appends.append(request.block_ids + blocks)
            request.table_sent = True

    def register(self, request: Request, num_computed: int) -> None:
        """The worker registers ``request``; ``num_computed`` of its tokens have
        K/V in its table already (a prefix hit, or a fork's shared prompt)."""
        self._new.append(NewRequest(
            request_id=request.request_id,
            token_ids=request.prefill_ids.tobytes(),
            num_output_tokens=request.num_outputs,
            sampling=request.sampling,
            num_computed_tokens=num_computed,
        ))

    def swap_in(self, request: Request, host: list[int], device: list[int]) -> None:
        self._swap_in[request.request_id] = (host, device)

    def build(self, step_id: int, finished: list[str],
              swap_out: list[tuple[Request, list[int], list[int]]],
              host_num_blocks: int) -> StepPlan:
        return StepPlan(
            step_id=step_id,
            finished=finished,
            new=self._new,
            host_num_blocks=host_num_blocks,
            swap_out=BlockMoves.pack({r.request_id: (d, h) for r, d, h in swap_out}),
            swap_in=BlockMoves.pack(self._swap_in),
            replaces=BlockReplaces.pack(self._replaces),
            copies=BlockCopies.pack(self._copies),
            batch=StepBatch.pack([r.request_id for r in self.batch], self._num_tokens,
                                 self._appends),
        )
