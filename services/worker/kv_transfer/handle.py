"""What a transfer's caller holds: a handle to poll or await, and the engine's counts."""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from services.worker.kv_transfer.state import Transfer, TransferState


class TransferHandle:
    """One side of one transfer, as its caller sees it: poll or await."""

    def __init__(self, transfer: Transfer) -> None:
        self.transfer = transfer
        self._ended = anyio.Event()
        self.changed = anyio.Event()  # replaced at each change (the sender's pump waits)

    @property
    def transfer_id(self) -> str:
        return self.transfer.transfer_id

    @property
    def state(self) -> TransferState:
        return self.transfer.state

    @property
    def bytes_moved(self) -> int:
        return self.transfer.bytes_moved

    @property
    def error(self) -> str:
        return self.transfer.error

    async def wait(self) -> Transfer:
        """Until the transfer ended (done, failed or cancelled)."""
        await self._ended.wait()
        return self.transfer

    def _notify(self) -> None:
        changed, self.changed = self.changed, anyio.Event()
        changed.set()
        if self.transfer.state.ended:
            self._ended.set()


@dataclass(frozen=True, slots=True)
class TransferStats:
    in_flight: int
    completed: int
    failed: int
    bytes_moved: int
    staging_bytes: int
