"""The transfers of one engine, as a pure state machine (no I/O, no clock of its own).

A transfer's life, on either side:

    PENDING ──(sender: first credit / receiver: begin accepted)──▶ RUNNING ──▶ DONE
       └──────────────┴── cancel ──▶ CANCELLED,  timeout / abort / bad data ──▶ FAILED

A sender's data is flow-controlled by the receiver's credits: it may have at most
``acked + window`` chunks sent, where ``acked`` counts chunks the receiver has
written; before the first credit it assumes a window of ``eager`` chunks. A
receiver that had not expected the id drops those and its first credit starts a
new epoch: the sender sends again from chunk 0 (shared/protocol/transfer.py).

A receiver accepts chunks only in order, only from the peer whose begin it
accepted, and reports DONE only once every chunk is written: a transfer that ends
any other way never looks complete.

Every method takes ``now`` (monotonic seconds) from its caller, so the unit tests
drive time by hand; the engine (engine.py) turns socket messages into these calls
and these results into socket messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum

from shared.protocol.transfer import (
    KvBlockLayout,
    TransferAbort,
    TransferBegin,
    TransferChunk,
    TransferCredit,
)
from shared.recent_ids import RecentIds

# Begins for ids not expected yet (the scheduler's two commands race): how many
# wait, and for at most how long (a begin's own timeout when shorter).
MAX_PARKED_BEGINS = 256
MAX_PARK_S = 60.0
# Ended ids remembered, so late chunks and begins for them get a clear abort.
ENDED_IDS_REMEMBERED = 4096


class TransferError(ValueError):
    """A request the book cannot accept (duplicate id, no blocks, bad sizes)."""


class TransferState(IntEnum):
    PENDING = 0
    RUNNING = 1
    # Terminal states sort after this marker: "ended" is one comparison.
    DONE = 2
    FAILED = 3
    CANCELLED = 4

    @property
    def ended(self) -> bool:
        return self >= TransferState.DONE


class Role(Enum):
    SEND = "send"
    RECEIVE = "receive"


@dataclass(slots=True)
class Transfer:
    """One side of one transfer. ``blocks`` are this side's block ids, in order."""

    transfer_id: str
    role: Role
    blocks: list[int]
    started_at: float
    deadline: float
    chunk_blocks: int = 0
    # Sender: the peer's transfer address; receiver: the sender's routing identity
    # (once its begin was accepted).
    peer: str | bytes = b""
    state: TransferState = TransferState.PENDING
    error: str = ""
    bytes_moved: int = 0
    acked: int = 0  # chunks the receiver has written
    sent: int = 0  # sender: chunks sent
    window: int = 0  # sender: the receiver's credit window
    ended_at: float = 0.0
    epoch: int = 0  # 1 once the receiver dropped the eager chunks (a parked begin)
    nccl_store: str = ""  # the data goes over NCCL (nccl.py); "": payload frames

    @property
    def num_chunks(self) -> int:
        return -(-len(self.blocks) // self.chunk_blocks) if self.chunk_blocks else 0

    def chunk(self, seq: int) -> tuple[int, int]:
        """(first, count): the blocks of chunk ``seq``, as indices into ``blocks``."""
        first = seq * self.chunk_blocks
        return first, min(self.chunk_blocks, len(self.blocks) - first)

    @property
    def seconds(self) -> float:
        return (self.ended_at or self.started_at) - self.started_at


@dataclass(frozen=True, slots=True)
class ParkedBegin:
    identity: bytes
    begin: TransferBegin
    deadline: float


@dataclass(slots=True)
class TransferBook:
    """Every live transfer of one engine, and what to answer each peer message.

    ``layout`` is this cache's block layout (a begin with another is refused);
    ``window`` the credit a receiver grants (chunks in flight per transfer)."""

    layout: KvBlockLayout
    window: int
    nccl: bool = False  # this engine has the NCCL data path
    live: dict[str, Transfer] = field(default_factory=dict)
    parked: dict[str, ParkedBegin] = field(default_factory=dict)
    ended: RecentIds[str] = field(default_factory=lambda: RecentIds(ENDED_IDS_REMEMBERED))
    # Those of them that were cancelled: a late begin learns it was a cancel.
    cancelled: RecentIds[str] = field(default_factory=lambda: RecentIds(ENDED_IDS_REMEMBERED))

    # ---- starting ----------------------------------------------------------------

    def start_send(self, transfer_id: str, peer: str, blocks: list[int], chunk_blocks: int,
                   now: float, timeout_s: float, nccl_store: str = "",
                   eager: int = 0) -> tuple[Transfer, TransferBegin]:
        """A new outgoing transfer and the begin to send its peer; ``eager`` chunks
        may follow the begin before any credit."""
        self._check_new(transfer_id, blocks, timeout_s)
        if chunk_blocks < 1:
            raise TransferError(f"chunk_blocks must be at least 1, got {chunk_blocks}")
        transfer = Transfer(transfer_id, Role.SEND, blocks, now, now + timeout_s,
                            chunk_blocks=chunk_blocks, peer=peer, nccl_store=nccl_store,
                            window=max(0, eager))
        self.live[transfer_id] = transfer
        begin = TransferBegin(transfer_id, len(blocks), chunk_blocks, self.layout, timeout_s,
                              nccl_store)
        return transfer, begin

    def expect(self, transfer_id: str, blocks: list[int], now: float,
               timeout_s: float) -> tuple[Transfer, TransferCredit | TransferAbort | None]:
        """A new incoming transfer; when its begin arrived already, the answer to it."""
        self._check_new(transfer_id, blocks, timeout_s)
        transfer = Transfer(transfer_id, Role.RECEIVE, blocks, now, now + timeout_s)
        self.live[transfer_id] = transfer
        parked = self.parked.pop(transfer_id, None)
        if parked is None:
            return transfer, None
        # The chunks sent with the begin were dropped while it waited: a new epoch.
        transfer.epoch = 1
        return transfer, self._accept(transfer, parked.identity, parked.begin, now)

    def _check_new(self, transfer_id: str, blocks: list[int], timeout_s: float) -> None:
        if not transfer_id:
            raise TransferError("a transfer needs an id")
        if transfer_id in self.live:
            raise TransferError(f"transfer {transfer_id} is already in progress")
        if not blocks:
            raise TransferError(f"transfer {transfer_id} has no blocks")
        if len(set(blocks)) != len(blocks):
            raise TransferError(f"transfer {transfer_id} names a block twice")
        if not timeout_s > 0:
            raise TransferError(f"transfer {transfer_id}: timeout must be positive")
        self.ended.discard(transfer_id)  # an id may be reused once its transfer ended
        self.cancelled.discard(transfer_id)

    # ---- receiver ------------------------------------------------------------------

    def on_begin(self, identity: bytes, begin: TransferBegin,
                 now: float) -> TransferCredit | TransferAbort | None:
        """A sender's begin: accepted (credit), refused (abort) or parked until the
        id is expected (None)."""
        transfer = self.live.get(begin.transfer_id)
        if transfer is None:
            if begin.transfer_id in self.ended:
                cancelled = begin.transfer_id in self.cancelled
                return TransferAbort(begin.transfer_id, "the receiver ended this transfer",
                                     cancelled=cancelled)
            if len(self.parked) >= MAX_PARKED_BEGINS and begin.transfer_id not in self.parked:
                return TransferAbort(begin.transfer_id,
                                     f"receiver busy: {MAX_PARKED_BEGINS} unexpected transfers")
            # (NaN compares false: such a begin is dropped at the next expiry.)
            park_s = min(begin.timeout_s, MAX_PARK_S) if begin.timeout_s > 0 else 0.0
            self.parked[begin.transfer_id] = ParkedBegin(identity, begin, now + park_s)
            return None
        if transfer.role is not Role.RECEIVE or transfer.state is not TransferState.PENDING:
            return TransferAbort(begin.transfer_id, "transfer already begun here")
        return self._accept(transfer, identity, begin, now)

    def _accept(self, transfer: Transfer, identity: bytes, begin: TransferBegin,
                now: float) -> TransferCredit | TransferAbort:
        transfer.peer = identity  # whatever the answer, it goes to this sender
        problem = ""
        if begin.layout != self.layout:
            problem = f"block layout {begin.layout} differs from the receiver's {self.layout}"
        elif begin.num_blocks != len(transfer.blocks):
            problem = (f"{begin.num_blocks} blocks sent, the receiver expects "
                       f"{len(transfer.blocks)}")
        elif begin.chunk_blocks < 1:
            problem = f"chunk_blocks {begin.chunk_blocks}"
        elif begin.nccl_store and not self.nccl:
            problem = "the sender uses NCCL, the receiver has no NCCL data path"
        if problem:
            self._end(transfer, TransferState.FAILED, problem, now)
            return TransferAbort(transfer.transfer_id, problem)
        transfer.chunk_blocks = begin.chunk_blocks
        transfer.nccl_store = begin.nccl_store
        transfer.state = TransferState.RUNNING
        return TransferCredit(transfer.transfer_id, 0, self.window, transfer.epoch)

    def check_chunk(self, identity: bytes, chunk: TransferChunk, payload_bytes: int | None,
                    block_bytes: int, now: float) -> Transfer | TransferAbort | None:
        """The transfer a chunk writes into, or the abort that answers it (and the
        transfer, when there is one, has FAILED). None: a chunk for a transfer
        that ended here a moment ago (already answered), dropped.
        ``payload_bytes`` None: the chunk came without a payload frame (which
        only an NCCL transfer's may)."""
        transfer = self.live.get(chunk.transfer_id)
        if transfer is None or transfer.role is not Role.RECEIVE:
            parked = self.parked.get(chunk.transfer_id)
            if chunk.transfer_id in self.ended or (parked and parked.identity == identity):
                return None  # (an eager chunk of a parked begin: sent again later)
            return TransferAbort(chunk.transfer_id, "no such transfer at the receiver")
        if transfer.state is TransferState.RUNNING and transfer.peer == identity \
                and chunk.epoch < transfer.epoch:
            return None  # sent before the sender learnt its eager chunks were dropped
        if transfer.state is not TransferState.RUNNING or transfer.peer != identity:
            problem = "chunk from a peer whose begin was not accepted"
        elif chunk.epoch != transfer.epoch:
            problem = f"chunk {chunk.seq} of epoch {chunk.epoch}, expected {transfer.epoch}"
        elif chunk.seq != transfer.acked:
            problem = f"chunk {chunk.seq} out of order (expected {transfer.acked})"
        elif (chunk.first, chunk.count) != transfer.chunk(chunk.seq):
            problem = f"chunk {chunk.seq} covers blocks {chunk.first}+{chunk.count}"
        elif (payload_bytes is None) != bool(transfer.nccl_store):
            problem = (f"chunk {chunk.seq} " + ("without a payload frame" if payload_bytes is None
                                                else "with a payload on an NCCL transfer"))
        elif payload_bytes is not None and payload_bytes != chunk.count * block_bytes:
            problem = (f"chunk {chunk.seq} carries {payload_bytes} bytes, "
                       f"{chunk.count} blocks take {chunk.count * block_bytes}")
        else:
            return transfer
        self._end(transfer, TransferState.FAILED, problem, now)
        return TransferAbort(transfer.transfer_id, problem)

    def chunk_written(self, transfer: Transfer, nbytes: int, now: float) -> TransferCredit | None:
        """A chunk is in the destination blocks: the credit to send (None: the
        transfer ended meanwhile, e.g. cancelled while the chunk was written)."""
        if transfer.state is not TransferState.RUNNING:
            return None
        transfer.acked += 1
        transfer.bytes_moved += nbytes
        if transfer.acked == transfer.num_chunks:
            self._end(transfer, TransferState.DONE, "", now)
        return TransferCredit(transfer.transfer_id, transfer.acked, self.window, transfer.epoch)

    # ---- sender --------------------------------------------------------------------

    def on_credit(self, credit: TransferCredit, block_bytes: int, now: float) -> Transfer | None:
        """A receiver's credit; the transfer it moved (None: unknown or ended)."""
        transfer = self.live.get(credit.transfer_id)
        if transfer is None or transfer.role is not Role.SEND or transfer.state.ended:
            return None
        if (credit.window < 1 or not transfer.acked <= credit.acked <= transfer.sent
                or credit.epoch not in (transfer.epoch, transfer.epoch + 1)):
            self._end(transfer, TransferState.FAILED,
                      f"bad credit {credit.acked}/{credit.window} (epoch {credit.epoch}) "
                      f"after {transfer.sent} chunks sent", now)
            return transfer
        if credit.epoch > transfer.epoch:  # the receiver dropped what was sent so far
            transfer.epoch = credit.epoch
            transfer.sent = credit.acked
        for seq in range(transfer.acked, credit.acked):
            transfer.bytes_moved += transfer.chunk(seq)[1] * block_bytes
        transfer.acked = credit.acked
        transfer.window = credit.window
        transfer.state = TransferState.RUNNING
        if transfer.acked == transfer.num_chunks:
            self._end(transfer, TransferState.DONE, "", now)
        return transfer

    def next_chunk(self, transfer: Transfer) -> TransferChunk | None:
        """The next chunk the credit (or, before the first, the eager window)
        allows, counted sent; or None."""
        if transfer.state.ended:
            return None
        if transfer.sent >= min(transfer.acked + transfer.window, transfer.num_chunks):
            return None
        seq = transfer.sent
        first, count = transfer.chunk(seq)
        transfer.sent += 1
        return TransferChunk(transfer.transfer_id, seq, first, count, transfer.epoch)

    # ---- either side ---------------------------------------------------------------

    def on_abort(self, abort: TransferAbort, identity: bytes | None, now: float) -> Transfer | None:
        """The peer ended the transfer. A receiver heeds only the peer it accepted
        (or, before that, drops the parked begin)."""
        transfer = self.live.get(abort.transfer_id)
        if transfer is None:
            parked = self.parked.get(abort.transfer_id)
            if parked is not None and parked.identity == identity:
                del self.parked[abort.transfer_id]
            return None
        if transfer.role is Role.RECEIVE and transfer.peer != identity:
            return None
        if transfer.role is Role.SEND and identity is not None:
            return None
        state = TransferState.CANCELLED if abort.cancelled else TransferState.FAILED
        who = "the receiver" if transfer.role is Role.SEND else "the sender"
        verb = "cancelled" if abort.cancelled else "failed"
        self._end(transfer, state, f"{who} {verb} it: {abort.reason}", now)
        return transfer

    def cancel(self, transfer_id: str, now: float) -> Transfer | None:
        """Cancel a live transfer (None: unknown or ended already; idempotent)."""
        transfer = self.live.get(transfer_id)
        self.parked.pop(transfer_id, None)
        if transfer is None:
            return None
        self._end(transfer, TransferState.CANCELLED, "cancelled", now)
        return transfer

    def fail(self, transfer: Transfer, reason: str, now: float) -> None:
        if not transfer.state.ended:
            self._end(transfer, TransferState.FAILED, reason, now)

    def expire(self, now: float) -> list[Transfer]:
        """Fail every live transfer past its deadline; forget parked begins past theirs."""
        for transfer_id, parked in list(self.parked.items()):
            if parked.deadline <= now:
                del self.parked[transfer_id]
        expired = [t for t in self.live.values() if t.deadline <= now]
        for transfer in expired:
            waited = now - transfer.started_at
            done = f"{transfer.acked}/{transfer.num_chunks or '?'} chunks"
            self._end(transfer, TransferState.FAILED,
                      f"timed out after {waited:.1f} s ({done} acknowledged)", now)
        return expired

    def next_deadline(self) -> float | None:
        deadlines = [t.deadline for t in self.live.values()]
        deadlines += [p.deadline for p in self.parked.values()]
        return min(deadlines, default=None)

    def _end(self, transfer: Transfer, state: TransferState, error: str, now: float) -> None:
        assert state.ended and not transfer.state.ended, (transfer.state, state)
        transfer.state = state
        transfer.error = error
        transfer.ended_at = now
        if self.live.get(transfer.transfer_id) is transfer:
            del self.live[transfer.transfer_id]
        self.ended.add(transfer.transfer_id)
        if state is TransferState.CANCELLED:
            self.cancelled.add(transfer.transfer_id)
