"""KV transfer: moving a request's KV blocks from one worker's cache to another's.

Two socket families.

**Commands** ride the worker's existing scheduler socket (scheduler -> worker, and
the report back). The scheduler tells the sending worker ``KvTransferOut`` and the
receiving worker ``KvTransferIn`` with the same ``transfer_id`` (either may arrive
first); each answers one ``KvTransferDone`` when its side ends, however it ends.

**Data** goes worker to worker on the transfer socket each worker binds (a ROUTER
at ``WorkerDetails.transfer_addr``); the sender connects a DEALER to it:

    sender                                     receiver (expected the id)
    TransferBegin(id, blocks, layout) ──────▶  checks layout and block count
    TransferChunk(id, seq=0) + [payload] ───▶  writes into its destination blocks
    ...  (the first ``window`` chunks go at once, without waiting for credit)
                                      ◀──────  TransferCredit(id, acked=0, window)
    ...  (at most ``window`` chunks unacknowledged)
                                      ◀──────  TransferCredit(id, acked=n)  (n = all: done)
    TransferAbort(id, reason)  ◀─────────────▶  either way: cancel, timeout, bad data

Eager chunks save a round trip when the receiver expected the id before the begin
came (the scheduler's usual order). When it had not, it parks the begin, drops the
chunks that follow, and once the id is expected answers a credit of ``epoch`` 1:
the sender sends again from chunk 0 stamped with epoch 1, and chunks of an older
epoch still in the pipe are dropped. (The NCCL data path sends nothing eagerly: a
dropped chunk there would be a send no receive ever matches.)

A chunk's payload is one extra frame after the envelope and body: the chunk's
blocks, ``[2 (K, V), layers, count, block_size, kv_heads, head_dim]`` in the
layout's dtype, sent zero-copy from a contiguous staging tensor. With the NCCL
data path (``TransferBegin.nccl_store``) the same bytes go GPU to GPU instead, and
the chunk message comes alone.

Schema evolution: new fields get defaults and go last; a breaking change bumps
``PROTOCOL_VERSION`` (shared/protocol/envelope.py).
"""

from __future__ import annotations

import msgspec

from shared.protocol.envelope import pack_i32

# ---- scheduler <-> worker (the worker's scheduler socket) ----------------------


class KvTransferOut(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Send the worker's blocks ``blocks`` (packed int32, in table order) to the
    worker whose transfer socket is ``peer_addr``. The blocks must stay unwritten
    until the ``KvTransferDone`` (the scheduler does not free or reuse them)."""

    transfer_id: str
    peer_addr: str
    blocks: bytes
    timeout_s: float = 30.0

    @classmethod
    def of(cls, transfer_id: str, peer_addr: str, blocks: list[int],
           timeout_s: float = 30.0) -> KvTransferOut:
        return cls(transfer_id, peer_addr, pack_i32(blocks), timeout_s)


class KvTransferIn(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Receive transfer ``transfer_id`` into the worker's blocks ``blocks`` (packed
    int32, the sender's blocks map to these in order). Only when every block has
    arrived is the ``KvTransferDone`` ok; after a failure the blocks hold garbage."""

    transfer_id: str
    blocks: bytes
    timeout_s: float = 30.0

    @classmethod
    def of(cls, transfer_id: str, blocks: list[int], timeout_s: float = 30.0) -> KvTransferIn:
        return cls(transfer_id, pack_i32(blocks), timeout_s)


class KvTransferCancel(msgspec.Struct, frozen=True, tag=True):
    """Stop transfer ``transfer_id`` on this side; the peer is told. Idempotent: the
    transfer's own ``KvTransferDone`` says it was cancelled, and an id that is not
    live (unknown, or ended already) gets no answer."""

    transfer_id: str


class KvTransferDone(msgspec.Struct, frozen=True, tag=True):
    """One side of a transfer ended: ``ok`` only when every block was sent (sender:
    and acknowledged) or arrived (receiver). ``state`` is the terminal state's name
    (done, failed, cancelled)."""

    transfer_id: str
    ok: bool
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    state: str = ""


TransferCommand = KvTransferOut | KvTransferIn | KvTransferCancel

# ---- worker <-> worker (the transfer socket) --------------------------------------


class KvBlockLayout(msgspec.Struct, frozen=True, array_like=True):
    """The shape of one block on the wire; both caches must agree on it."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch's name without the prefix: "bfloat16", "float32", ...


class TransferBegin(msgspec.Struct, frozen=True, tag=True):
    """Sender -> receiver: a transfer of ``num_blocks`` blocks in chunks of up to
    ``chunk_blocks``. ``timeout_s`` bounds how long a receiver that has not been
    told to expect the id yet keeps it waiting."""

    transfer_id: str
    num_blocks: int
    chunk_blocks: int
    layout: KvBlockLayout
    timeout_s: float = 30.0
    # Non-empty: chunks carry no payload frame, their data goes over NCCL in the
    # two-rank group rendezvousing at this FileStore path (services/worker/
    # kv_transfer/nccl.py).
    nccl_store: str = ""


class TransferChunk(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Sender -> receiver, followed by one payload frame: blocks ``first`` to
    ``first + count`` (indices into the transfer, not block ids). Chunks come in
    order: ``seq`` is the chunk's index."""

    transfer_id: str
    seq: int
    first: int
    count: int
    epoch: int = 0  # the sender's epoch when it sent this (see the module docstring)


class TransferCredit(msgspec.Struct, frozen=True, tag=True, gc=False):
    """Receiver -> sender: ``acked`` chunks are written; the sender may have up to
    ``acked + window`` sent. ``acked`` equal to the chunk count: the transfer is done."""

    transfer_id: str
    acked: int
    window: int
    # 1: the receiver dropped the chunks sent before this credit; send again from
    # ``acked`` (0), stamped with this epoch.
    epoch: int = 0


class TransferAbort(msgspec.Struct, frozen=True, tag=True):
    """Either way: the transfer is over on the sending side of this message."""

    transfer_id: str
    reason: str
    cancelled: bool = False  # asked for (cancel), not a failure


ToTransferReceiver = TransferBegin | TransferChunk | TransferAbort
ToTransferSender = TransferCredit | TransferAbort
