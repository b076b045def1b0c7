"""The NCCL data path: chunk payloads GPU to GPU, the control still on the
transfer socket (``transfer_backend=nccl``).

    sender                                               receiver
    TransferBegin(nccl_store=path) ───── ZMQ ─────▶  joins the pair's group at path
    TransferChunk (no payload frame) ─── ZMQ ─────▶  recv into a device buffer
    gather on the side stream, send ═══ NCCL ═════▶  write into the destination blocks
                                    ◀──── ZMQ ─────  TransferCredit

As vLLM's P2pNcclConnector does, each sender/receiver pair gets its own two-rank
NCCL group (the sender is rank 0), set up on the first transfer between them:
here a ``ProcessGroupNCCL`` over a ``FileStore`` whose path the sender picks in its
store dir and names in the begin, so both sides must share a filesystem (one host;
across hosts a TCPStore would take its place). NCCL matches a pair's sends and
receives in issue order: the engine holds the pair's lock from the chunk's control
message until its send is issued, and the receiver issues receives in the order
the control messages arrive.

Everything here blocks the calling thread (the engine runs it in worker threads)
and runs on the stager's side stream, never the step stream.

Limits: an NCCL operation whose peer died never completes; the engine fails the
transfer at its deadline, abandons the thread and ``forget``s the pair (its group
is aborted). Without CUDA or NCCL, ``nccl_available()`` is False and
``NcclDataPath`` refuses to start; importing this module needs neither.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import torch
import torch.distributed as dist

from services.worker.kv_transfer.staging import BlockStager


def nccl_available() -> bool:
    return torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()


class NcclDataPath:
    """Pairwise NCCL groups of one engine, and a chunk's send and receive."""

    SENDER, RECEIVER = 0, 1

    def __init__(self, stager: BlockStager, store_dir: str) -> None:
        if not nccl_available():
            raise RuntimeError("transfer_backend=nccl needs CUDA and a torch build with NCCL; "
                               "use transfer_backend=zmq here")
        if stager.device.type != "cuda":
            raise RuntimeError(f"transfer_backend=nccl needs the KV cache on CUDA, "
                               f"not {stager.device}")
        self.stager = stager
        self._store_dir = store_dir
        self._stores: dict[str, str] = {}  # peer address -> the pair's store (sender)
        self._groups: dict[str, Any] = {}  # store path -> ProcessGroupNCCL
        self._lock = threading.Lock()  # groups are made in worker threads

    def store_for(self, peer_addr: str) -> str:
        """The store of this engine's pair with ``peer_addr`` (sending side)."""
        store = self._stores.get(peer_addr)
        if store is None:
            os.makedirs(self._store_dir, exist_ok=True)
            store = os.path.join(self._store_dir, f"nccl-{uuid.uuid4().hex[:16]}")
            self._stores[peer_addr] = store
        return store

    def _group(self, store: str, rank: int) -> Any:
        with self._lock:
            group = self._groups.get(store)
            if group is None:
                group = dist.ProcessGroupNCCL(dist.FileStore(store, 2), rank, 2)
                self._groups[store] = group
            return group

    def send_chunk(self, store: str, blocks: list[int]) -> None:
        """Send the blocks to the pair's receiver; returns once NCCL has sent them."""
        group = self._group(store, self.SENDER)
        with self.stager.side_stream() as stream:
            staged = self.stager.gather_on_device(blocks)
            group.send([staged], self.RECEIVER, 0).wait()
            sent = torch.cuda.Event()
            sent.record(stream)
        sent.synchronize()

    def recv_chunk(self, store: str, blocks: list[int]) -> None:
        """Receive a chunk from the pair's sender into ``blocks``; returns once written."""
        group = self._group(store, self.RECEIVER)
        with self.stager.side_stream() as stream:
            staged = self.stager.empty_on_device(len(blocks))
            group.recv([staged], self.SENDER, 0).wait()
            self.stager.write_on_device(blocks, staged)
            written = torch.cuda.Event()
            written.record(stream)
        written.synchronize()

    def forget(self, store: str) -> None:
        """Drop a pair whose peer failed (its group is aborted; the next transfer
        between the two makes a new one)."""
        for peer, known in list(self._stores.items()):
            if known == store:
                del self._stores[peer]
        with self._lock:
            group = self._groups.pop(store, None)
        if group is not None and hasattr(group, "abort"):
            group.abort()

    def close(self) -> None:
        for store in list(self._groups):
            self.forget(store)
