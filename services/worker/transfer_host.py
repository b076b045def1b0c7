"""The worker's side of KV transfers: scheduler commands in, ``KvTransferDone`` out.

    scheduler ──KvTransferOut / KvTransferIn / KvTransferCancel──▶ TransferHost
                                         ─▶ KvTransferEngine.send / expect / cancel
    scheduler ◀──KvTransferDone (one per command, however it ends)──┘

Transfers run beside the step loop, never in it: chunks are staged and written in
threads on their own (CUDA: a side stream), while plans keep being launched. Blocks
being sent are read-only and blocks being received unused until the done report;
the scheduler guarantees both (it plans no step that touches them).

A command that cannot start (bad block ids, a duplicate id, no transfer socket on
this worker) is a logged rejection and a failed ``KvTransferDone`` at once, never
an exception out of the actor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup, TaskStatus
from opentelemetry.context import Context
from opentelemetry.trace import StatusCode

from services.worker.kv_transfer.engine import KvTransferEngine
from services.worker.kv_transfer.handle import TransferHandle
from services.worker.kv_transfer.state import TransferError, TransferState
from shared.logs import get_logger
from shared.mesh import RejectionLog
from shared.protocol.tables import TableError, check_ids, unpack_ints
from shared.protocol.transfer import (
    KvTransferCancel,
    KvTransferDone,
    KvTransferIn,
    KvTransferOut,
    TransferCommand,
)
from shared.telemetry import tracer

log = get_logger("meshserve.worker.transfer")
_tracer = tracer("meshserve.worker")

Report = Callable[[KvTransferDone], Awaitable[None]]


class TransferHost:
    """Runs a worker's transfer engine (``None``: this worker has no transfer
    socket) and answers the scheduler's transfer commands through ``report``."""

    def __init__(self, engine: KvTransferEngine | None, num_blocks: int,
                 rejections: RejectionLog, report: Report) -> None:
        self.engine = engine
        self._num_blocks = num_blocks
        self._rejections = rejections
        self._report = report
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            if self.engine is not None:
                await tg.start(self.engine.run)
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    async def on_command(self, command: TransferCommand, context: Context) -> None:
        if isinstance(command, KvTransferCancel):
            if self.engine is not None:
                await self.engine.cancel(command.transfer_id)
            return  # the transfer's own report says it was cancelled
        try:
            handle = self._start(command)
        except (TransferError, TableError) as e:
            reason = f"transfer {command.transfer_id!r} refused: {e}"
            self._rejections.record("scheduler", reason)
            await self._report(KvTransferDone(command.transfer_id, False, error=reason,
                                              state="failed"))
            return
        assert self._tg is not None
        self._tg.start_soon(self._report_when_ended, handle, command, context)

    async def cancel_all(self) -> None:
        """The scheduler that ordered the live transfers is gone: end them all."""
        if self.engine is not None:
            for transfer_id in list(self.engine.book.live):
                await self.engine.cancel(transfer_id)

    def _start(self, command: KvTransferOut | KvTransferIn) -> TransferHandle:
        if self.engine is None or self._tg is None:
            raise TransferError("this worker has no transfer socket (transfer_addr is unset)")
        blocks = unpack_ints(command.blocks, "blocks")
        check_ids(blocks, self._num_blocks, "block")
        if isinstance(command, KvTransferOut):
            return self.engine.send(command.transfer_id, command.peer_addr, blocks,
                                    command.timeout_s)
        return self.engine.expect(command.transfer_id, blocks, command.timeout_s)

    async def _report_when_ended(self, handle: TransferHandle,
                                 command: KvTransferOut | KvTransferIn, context: Context) -> None:
        direction = "out" if isinstance(command, KvTransferOut) else "in"
        attributes = {"meshserve.transfer_id": command.transfer_id,
                      "meshserve.transfer.direction": direction,
                      "meshserve.transfer.blocks": len(handle.transfer.blocks)}
        with _tracer.start_as_current_span("worker.kv_transfer", context=context,
                                           attributes=attributes) as span:
            transfer = await handle.wait()
            span.set_attribute("meshserve.transfer.bytes", transfer.bytes_moved)
            if transfer.state is not TransferState.DONE:
                span.set_status(StatusCode.ERROR, transfer.error)
        await self._report(KvTransferDone(
            transfer.transfer_id, transfer.state is TransferState.DONE,
            bytes=transfer.bytes_moved, seconds=transfer.seconds, error=transfer.error,
            state=transfer.state.name.lower()))
