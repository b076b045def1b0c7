"""The KV transfer engine: the asyncio/ZMQ shell around ``TransferBook``.

    sender engine                                    receiver engine
    send(id, peer, blocks) ─▶ pump task ─DEALER(peer)──▶ ROUTER (bound, advertised)
      gather chunk (thread) ─▶ [env, TransferChunk, payload] ─▶ check ─▶ scatter (thread)
                         ◀── TransferCredit (acked, window) ◀──────┘
    handle: state, bytes_moved, await wait()          expect(id, blocks) ─▶ handle

One ROUTER per engine receives begins and chunks from every sender; a sender opens
one DEALER per receiver it sends to, shared by its transfers there. Each socket
has exactly one receiving task. Chunks are staged and written in a worker thread
(staging.py), so neither the event loop nor the model's step waits on a copy.

Payloads leave zero-copy (``copy=False``): ZMQ holds the staging tensor until its
frame is on the wire, which the message tracker reports; ``staging_bytes`` counts
the staged chunks not yet released. A receiver's credit window bounds how many
chunks one transfer has in flight, so memory stays bounded whatever its size; the
first window follows the begin without waiting (state.py: eager chunks, epochs).

With an ``NcclDataPath`` (``transfer_backend=nccl``) the begins, chunk messages
and credits still take this path, but each chunk's bytes go GPU to GPU over the
pair's NCCL group (nccl.py), one chunk of a pair at a time.

Failure: every transfer has a deadline on each side; past it the transfer FAILS,
the peer is told (best effort), and a sender drops its connection to that peer
(closing it releases the chunks queued for a dead peer). A transfer is DONE only
when every chunk is written (receiver) or acknowledged (sender).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import torch
import zmq
import zmq.asyncio
from anyio.abc import TaskGroup, TaskStatus

from services.worker.kv_transfer.handle import TransferHandle, TransferStats
from services.worker.kv_transfer.staging import BlockStager
from services.worker.kv_transfer.state import (
    Role,
    Transfer,
    TransferBook,
    TransferError,
    TransferState,
)
from shared.frames import FrameWriter, decode_frames
from shared.logs import get_logger
from shared.mesh import RejectionLog, bind_address
from shared.protocol.common import Rejected
from shared.protocol.transfer import (
    ToTransferReceiver,
    ToTransferSender,
    TransferAbort,
    TransferBegin,
    TransferChunk,
    TransferCredit,
)

if TYPE_CHECKING:
    from services.worker.kv_transfer.nccl import NcclDataPath
    from shared.mesh_auth import MeshAuth

log = get_logger("meshserve.kv_transfer")

DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_WINDOW = 4
# How often deadlines are checked: a dead peer is noticed within timeout + this.
EXPIRY_TICK_S = 0.05
# A dropped connection keeps trying to deliver queued frames this long.
CLOSE_LINGER_MS = 200
# Connections to receivers kept open; past this, idle ones are closed first and a
# new peer beyond it is refused (each costs a socket and a receiving task).
MAX_PEER_LINKS = 64


@dataclass(slots=True)
class _PeerLink:
    """A sender's DEALER to one receiver, with its receiving task's scope."""

    socket: zmq.asyncio.Socket
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class KvTransferEngine:
    """Moves KV blocks between this cache (through ``stager``) and other engines.

    ``address`` is where the ROUTER binds (what ``WorkerDetails.transfer_addr``
    advertises); ``auth`` makes every socket CURVE, as the mesh's are."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, sender: str,
                 stager: BlockStager, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 window: int = DEFAULT_WINDOW, auth: MeshAuth | None = None,
                 nccl: NcclDataPath | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1:
            raise ValueError(f"transfer window must be at least 1, got {window}")
        self.address = address
        self.stager = stager
        self.chunk_blocks = max(1, chunk_bytes // stager.block_bytes)
        self.book = TransferBook(stager.layout, window, nccl=nccl is not None)
        self._nccl = nccl
        self._pair_locks: dict[str, anyio.Lock] = {}  # NCCL: a pair's chunks in order
        self.rejections = RejectionLog(f"{sender}@{address}")
        self._ctx = ctx
        self._auth = auth
        self._clock = clock
        self._writer = FrameWriter(sender)
        self._router = ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._to_receiver = msgspec.msgpack.Decoder(ToTransferReceiver)
        self._to_sender = msgspec.msgpack.Decoder(ToTransferSender | Rejected)
        self._handles: dict[str, TransferHandle] = {}
        self._links: dict[str, _PeerLink] = {}
        self._tg: TaskGroup | None = None
        self._staged: list[tuple[zmq.MessageTracker, int]] = []
        self._gathering = 0
        self.completed = 0
        self.failed = 0
        self.total_bytes = 0

    # ---- the API -------------------------------------------------------------------

    def send(self, transfer_id: str, peer_addr: str, blocks: list[int],
             timeout_s: float) -> TransferHandle:
        """Start sending ``blocks`` to the engine bound at ``peer_addr``. Raises
        ``TransferError`` for a request it cannot start (the caller reports it)."""
        tg = self._task_group()
        if not peer_addr:
            raise TransferError(f"transfer {transfer_id}: no peer address")
        link = self._link(peer_addr)
        nccl_store = self._nccl.store_for(peer_addr) if self._nccl is not None else ""
        # A window's worth of chunks follows the begin at once; none over NCCL,
        # where a dropped chunk would be a send that no receive matches.
        eager = 0 if self._nccl is not None else self.book.window
        transfer, begin = self.book.start_send(transfer_id, peer_addr, blocks, self.chunk_blocks,
                                               self._clock(), timeout_s, nccl_store, eager)
        handle = self._track(transfer)
        tg.start_soon(self._pump, handle, link, begin)
        return handle

    def expect(self, transfer_id: str, blocks: list[int], timeout_s: float) -> TransferHandle:
        """Receive transfer ``transfer_id`` into ``blocks``. Raises ``TransferError``."""
        tg = self._task_group()
        transfer, answer = self.book.expect(transfer_id, blocks, self._clock(), timeout_s)
        handle = self._track(transfer)
        if answer is not None:  # its begin was waiting
            tg.start_soon(self._answer_sender, transfer.peer, answer)
            self._settle(transfer)
        return handle

    async def cancel(self, transfer_id: str) -> bool:
        """Cancel a live transfer on this side and tell the peer; False when there is
        none (unknown or ended already)."""
        transfer = self.book.cancel(transfer_id, self._clock())
        if transfer is None:
            return False
        self._settle(transfer)
        await self._tell_peer(transfer, TransferAbort(transfer_id, "cancelled", cancelled=True))
        return True

    def handle(self, transfer_id: str) -> TransferHandle | None:
        return self._handles.get(transfer_id)

    @property
    def staging_bytes(self) -> int:
        """Bytes of staged chunks ZMQ still holds (or being staged now)."""
        self._staged = [(tracker, n) for tracker, n in self._staged if not tracker.done]
        return self._gathering + sum(n for _, n in self._staged)

    def stats(self) -> TransferStats:
        return TransferStats(len(self.book.live), self.completed, self.failed,
                             self.total_bytes, self.staging_bytes)

    # ---- running -------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started, then serve until cancelled; live transfers fail
        and every socket closes however it ends."""
        try:
            async with anyio.create_task_group() as tg:
                if self._auth is not None:
                    handshakes = self._auth.serve(self._router)
                    tg.start_soon(self._auth.watch, self._router, handshakes,
                                  self.rejections.endpoint)
                try:
                    self._router.bind(bind_address(self.address))
                except zmq.ZMQError as e:
                    raise OSError(f"cannot bind the KV transfer socket {self.address}: {e}") from e
                self._tg = tg
                tg.start_soon(self._expire_forever)
                task_status.started()
                await self._receive_as_receiver()
        finally:
            self._tg = None
            now = self._clock()
            for transfer in list(self.book.live.values()):
                self.book.fail(transfer, "the transfer engine stopped", now)
                self._settle(transfer)
            for link in self._links.values():
                link.socket.close(linger=0)
            self._links.clear()
            self._router.close(linger=0)
            if self._nccl is not None:
                self._nccl.close()

    def _task_group(self) -> TaskGroup:
        if self._tg is None:
            raise TransferError("the transfer engine is not running")
        return self._tg

    def _track(self, transfer: Transfer) -> TransferHandle:
        handle = TransferHandle(transfer)
        self._handles[transfer.transfer_id] = handle
        return handle

    def _settle(self, transfer: Transfer) -> None:
        """Wake whoever waits on the transfer; account for it once it ended."""
        handle = self._handles.get(transfer.transfer_id)
        if handle is None or handle.transfer is not transfer:
            return
        if transfer.state.ended:
            del self._handles[transfer.transfer_id]
            if transfer.state is TransferState.DONE:
                self.completed += 1
                self.total_bytes += transfer.bytes_moved
            else:
                self.failed += 1
                log.info("kv transfer ended", transfer_id=transfer.transfer_id,
                         role=transfer.role.value, state=transfer.state.name.lower(),
                         error=transfer.error, bytes=transfer.bytes_moved)
        handle._notify()

    async def _expire_forever(self) -> None:
        while True:
            await anyio.sleep(EXPIRY_TICK_S)
            for transfer in self.book.expire(self._clock()):
                self._settle(transfer)
                await self._tell_peer(transfer, TransferAbort(transfer.transfer_id,
                                                              transfer.error))
                if transfer.role is Role.SEND:
                    # A peer that let a transfer time out is dead or stuck: drop the
                    # connection, releasing what is queued for it.
                    self._drop_link(str(transfer.peer))

    async def _tell_peer(self, transfer: Transfer, abort: TransferAbort) -> None:
        """Best effort: a peer that cannot be told fails the transfer by its deadline."""
        if transfer.role is Role.SEND:
            link = self._links.get(str(transfer.peer))
            if link is not None:
                with contextlib.suppress(TransferError):
                    await self._send_dealer(link, abort)
        elif isinstance(transfer.peer, bytes) and transfer.peer:
            await self._answer_sender(transfer.peer, abort)

    # ---- receiver side ---------------------------------------------------------------

    async def _receive_as_receiver(self) -> None:
        """The ROUTER's one receiving task. It handles each message itself instead of
        feeding an inbox: chunks must be written in order anyway, and while one is
        written the next waits in ZMQ's queue, which the credit window bounds."""
        while True:
            frames = await self._router.recv_multipart(copy=False)
            identity = frames[0].bytes
            # [identity, envelope, body] and, for a chunk, its payload.
            payload = frames[3].buffer if len(frames) == 4 else None
            if 3 <= len(frames) <= 4:
                decoded = decode_frames([frames[1].bytes, frames[2].bytes], self._to_receiver)
            else:
                decoded = f"expected 2 or 3 frames, got {len(frames) - 1}"
            if isinstance(decoded, str):
                self.rejections.record(identity.hex(), decoded)
                await self._answer_sender(identity, Rejected(reason=decoded))
                continue
            envelope, body = decoded
            if payload is not None and not isinstance(body, TransferChunk):
                reason = f"{type(body).__name__} with {len(frames) - 1} frames"
                self.rejections.record(envelope.sender, reason)
                await self._answer_sender(identity, Rejected(reason, envelope.msg_id))
                continue
            await self._on_receiver_message(identity, body, payload)

    async def _on_receiver_message(self, identity: bytes, body: Any,
                                   payload: memoryview | None) -> None:
        """``payload``: a chunk's frame (None: none came, as on an NCCL transfer)."""
        now = self._clock()
        match body:
            case TransferBegin():
                answer = self.book.on_begin(identity, body, now)
                transfer = self.book.live.get(body.transfer_id)
                if transfer is not None:
                    self._settle(transfer)
                if answer is not None:
                    await self._answer_sender(identity, answer)
            case TransferChunk():
                await self._write_chunk(identity, body, payload)
            case TransferAbort():
                transfer = self.book.on_abort(body, identity, now)
                if transfer is not None:
                    self._settle(transfer)

    async def _write_chunk(self, identity: bytes, chunk: TransferChunk,
                           payload: memoryview | None) -> None:
        checked = self.book.check_chunk(identity, chunk,
                                        None if payload is None else payload.nbytes,
                                        self.stager.block_bytes, self._clock())
        if isinstance(checked, TransferAbort):
            self.rejections.record(identity.hex(), checked.reason)
            transfer = self._handles.get(chunk.transfer_id)
            if transfer is not None:
                self._settle(transfer.transfer)
            await self._answer_sender(identity, checked)
            return
        if checked is None:
            return
        blocks = checked.blocks[chunk.first:chunk.first + chunk.count]
        if payload is None:
            # NCCL: the receive waits for the sender's GPU, so it runs beside this
            # loop (which keeps serving other transfers); the pair's lock keeps
            # receives in the order their chunk messages came.
            self._task_group().start_soon(self._receive_over_nccl, identity, checked, blocks)
            return
        await anyio.to_thread.run_sync(self.stager.scatter, blocks, payload)
        await self._written(identity, checked, payload.nbytes)

    async def _written(self, identity: bytes, transfer: Transfer, nbytes: int) -> None:
        credit = self.book.chunk_written(transfer, nbytes, self._clock())
        self._settle(transfer)
        if credit is not None:
            await self._answer_sender(identity, credit)

    async def _receive_over_nccl(self, identity: bytes, transfer: Transfer,
                                 blocks: list[int]) -> None:
        assert self._nccl is not None
        async with self._pair_lock(transfer.nccl_store):
            if await self._until_ended(transfer, self._nccl.recv_chunk, transfer.nccl_store,
                                       blocks):
                await self._written(identity, transfer, len(blocks) * self.stager.block_bytes)

    def _pair_lock(self, store: str) -> anyio.Lock:
        return self._pair_locks.setdefault(store, anyio.Lock())

    async def _until_ended(self, transfer: Transfer, call: Callable[..., None],
                           *args: Any) -> bool:
        """Run a blocking NCCL ``call`` in a thread unless the transfer ends first;
        False then: the thread is abandoned (an NCCL operation whose peer died never
        returns) and the pair is forgotten, its group aborted."""
        handle = self._handles.get(transfer.transfer_id)
        if handle is None or transfer.state.ended:
            return False
        finished = False
        async with anyio.create_task_group() as tg:
            async def run_call() -> None:
                nonlocal finished
                await anyio.to_thread.run_sync(call, *args, abandon_on_cancel=True)
                finished = True
                tg.cancel_scope.cancel()

            tg.start_soon(run_call)
            await handle.wait()
            tg.cancel_scope.cancel()
        if not finished and transfer.state is not TransferState.DONE and self._nccl is not None:
            self._nccl.forget(transfer.nccl_store)
            self._pair_locks.pop(transfer.nccl_store, None)
        return finished

    async def _answer_sender(self, identity: str | bytes, body: Any) -> None:
        assert isinstance(identity, bytes)
        try:
            await self._router.send_multipart([identity, *self._writer.frames(body)],
                                              flags=zmq.NOBLOCK)
        except zmq.Again:
            self.rejections.record(identity.hex(), f"{type(body).__name__} dropped: peer full")
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            # The sender is gone; its transfer fails by its deadline here.

    # ---- sender side -------------------------------------------------------------------

    def _link(self, peer_addr: str) -> _PeerLink:
        link = self._links.get(peer_addr)
        if link is not None:
            return link
        if len(self._links) >= MAX_PEER_LINKS:
            for idle in list(self._links):
                self._drop_link(idle)
            if len(self._links) >= MAX_PEER_LINKS:
                raise TransferError(f"{MAX_PEER_LINKS} peers have transfers in flight already")
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self._auth is not None:
            self._auth.connect(socket)
        try:
            socket.connect(peer_addr)
        except zmq.ZMQError as e:
            socket.close(linger=0)
            raise TransferError(f"cannot connect to the peer at {peer_addr!r}: {e}") from e
        link = _PeerLink(socket)
        self._links[peer_addr] = link
        self._task_group().start_soon(self._receive_as_sender, link, peer_addr)
        return link

    def _drop_link(self, peer_addr: str) -> None:
        """Close the connection to ``peer_addr`` unless a live transfer uses it."""
        if any(t.peer == peer_addr for t in self.book.live.values() if t.role is Role.SEND):
            return
        link = self._links.pop(peer_addr, None)
        if link is not None:
            # Cancelling its pending recv could lose a message: the socket closes
            # right after, so there is nothing left to lose.
            link.scope.cancel()
            link.socket.close(linger=CLOSE_LINGER_MS)

    async def _receive_as_sender(self, link: _PeerLink, peer_addr: str) -> None:
        with link.scope:
            while True:
                frames = await link.socket.recv_multipart()
                decoded = decode_frames(frames, self._to_sender)
                if isinstance(decoded, str):
                    self.rejections.record(peer_addr, decoded)
                    continue
                _, body = decoded
                now = self._clock()
                transfer: Transfer | None = None
                match body:
                    case TransferCredit():
                        transfer = self.book.on_credit(body, self.stager.block_bytes, now)
                    case TransferAbort():
                        transfer = self.book.on_abort(body, None, now)
                    case Rejected():
                        self.rejections.record(peer_addr, f"the receiver rejected: {body.reason}")
                if transfer is not None:
                    self._settle(transfer)

    async def _send_dealer(self, link: _PeerLink, body: Any, payload: Any = None) -> Any:
        """Send without waiting for room: credit keeps a live peer's queue short, so
        a full one means a peer that stopped reading, and a send that waited for it
        would hang this task. Raises ``TransferError`` when it could not send; a
        payload is sent zero-copy and its tracker returned."""
        frames: list[Any] = self._writer.frames(body)
        try:
            if payload is None:
                return await link.socket.send_multipart(frames, flags=zmq.NOBLOCK)
            return await link.socket.send_multipart([*frames, payload], flags=zmq.NOBLOCK,
                                                    copy=False, track=True)
        except zmq.ZMQError as e:  # Again (queue full), or the link was dropped
            raise TransferError(f"{type(body).__name__} not sent: {e}") from e

    async def _pump(self, handle: TransferHandle, link: _PeerLink, begin: TransferBegin) -> None:
        """Send the begin, then every chunk the receiver's credit allows, until the
        transfer ends; a send that fails fails the transfer."""
        try:
            await self._send_all(handle, link, begin)
        except TransferError as e:
            self.book.fail(handle.transfer, str(e), self._clock())
            self._settle(handle.transfer)

    async def _send_all(self, handle: TransferHandle, link: _PeerLink,
                        begin: TransferBegin) -> None:
        transfer = handle.transfer
        await self._send_dealer(link, begin)
        while not transfer.state.ended:
            changed = handle.changed
            chunk = self.book.next_chunk(transfer)
            if chunk is None:
                await changed.wait()
                continue
            blocks = transfer.blocks[chunk.first:chunk.first + chunk.count]
            if self._nccl is not None:
                async with self._pair_lock(transfer.nccl_store):
                    await self._send_dealer(link, chunk)
                    await self._until_ended(transfer, self._nccl.send_chunk,
                                            transfer.nccl_store, blocks)
                continue
            nbytes = len(blocks) * self.stager.block_bytes
            self._gathering += nbytes
            try:
                staged = await anyio.to_thread.run_sync(self.stager.gather, blocks)
            finally:
                self._gathering -= nbytes
            if transfer.state.ended:
                break
            # Raw bytes of the staged tensor, handed to ZMQ without a copy.
            raw = memoryview(staged.view(-1).view(torch.uint8).numpy())
            tracker = await self._send_dealer(link, chunk, raw)
            self._staged.append((tracker, nbytes))

