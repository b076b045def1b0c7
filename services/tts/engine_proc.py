"""One engine process: ``python -m services.tts.engine_proc``, started by a tts replica.

Why a subprocess with a ZMQ PAIR (and not multiprocessing with a pipe): the wire
stays msgspec (multiprocessing pickles, which the mesh never does), the replica's
event loop reads the engine with zmq.asyncio like any other socket, and the engine
can poll the same socket between audio buffers, which is how a cancel reaches a
running synthesis without threads or signals. A process per engine because
espeak-ng's library state is global; killing the process is the last resort when an
engine stops answering. The replica starts it with ``shared.child_process.spawn_child``,
which makes the kernel kill it when the replica dies.

Protocol (``shared.protocol.speech``, bare msgpack frames): the engine connects,
sends ``EngineReady``, then serves ``EngineSynthesize`` jobs one at a time, streaming
``EngineAudio`` pieces of exactly ``piece_samples`` samples and a ``final`` one with
the rest. ``EngineCancel`` for the running job ends it early (``cancelled``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from pathlib import Path

import msgspec
import zmq

from services.tts.engines.base import Engine, EngineError, load_engine
from services.tts.resample import Resampler
from shared.config import load_config
from shared.curve import load_keys
from shared.logs import configure_logging, get_logger
from shared.protocol.speech import (
    EngineAudio,
    EngineCancel,
    EngineCommand,
    EngineReady,
    EngineSynthesize,
)

log = get_logger("meshserve.tts.engine")


class EngineProcessConfig(msgspec.Struct, frozen=True):
    """Set by the replica that starts the process (env MESHSERVE_<FIELD>)."""

    engine_addr: str = ""
    engine: str = "espeak-ng"
    engine_slot: int = 0
    replica: int = 0
    log_level: str = "info"
    curve_dir: str = ""  # the mesh's keys: the replica's engine socket is a CURVE server


class EngineServer:
    """Serves one engine over a connected PAIR socket until the socket closes."""

    def __init__(self, engine: Engine, socket: zmq.Socket[bytes]) -> None:
        self.engine = engine
        self.socket = socket
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineCommand)
        # Commands read while polling for a cancel, to be served afterwards.
        self._pending: deque[EngineCommand] = deque()

    def _send(self, message: EngineReady | EngineAudio) -> None:
        self.socket.send(self._encoder.encode(message))

    def _receive(self) -> EngineCommand:
        command: EngineCommand = self._decoder.decode(self.socket.recv())
        return command

    def serve_forever(self) -> None:
        self._send(
            EngineReady(
                engine=self.engine.name,
                sample_rate=self.engine.sample_rate,
                models=self.engine.models(),
                voices=self.engine.voices(),
                pid=os.getpid(),
            )
        )
        while True:
            command = self._pending.popleft() if self._pending else self._receive()
            if isinstance(command, EngineSynthesize):
                self.run_job(command)
            # An EngineCancel here is for a job that already ended: nothing to do.

    def _cancel_requested(self, job_id: int) -> bool:
        """Drain what arrived during synthesis; True if it cancels ``job_id``."""
        cancelled = False
        while self.socket.poll(0, zmq.POLLIN):
            command = self._receive()
            if isinstance(command, EngineCancel):
                cancelled = cancelled or command.job_id == job_id
            else:
                self._pending.append(command)
        return cancelled

    def run_job(self, job: EngineSynthesize) -> None:
        native = self.engine.sample_rate
        resampler = (
            Resampler(native, job.sample_rate)
            if job.sample_rate and job.sample_rate != native
            else None
        )
        piece_bytes = max(1, job.piece_samples) * 2
        pending = bytearray()
        cancelled = False

        def sink(pcm: bytes) -> bool:
            nonlocal cancelled
            pending.extend(resampler.process(pcm) if resampler else pcm)
            while len(pending) >= piece_bytes:
                self._send(EngineAudio(job.job_id, bytes(pending[:piece_bytes]), final=False))
                del pending[:piece_bytes]
            if self._cancel_requested(job.job_id):
                cancelled = True
                return False
            return True

        try:
            self.engine.synthesize(job.text, job.voice, job.speed, sink)
        except EngineError as e:
            log.warning("synthesis failed", job_id=job.job_id, error=str(e))
            self._send(EngineAudio(job.job_id, b"", final=True, error=str(e)))
            return
        if cancelled:
            self._send(EngineAudio(job.job_id, b"", final=True, cancelled=True))
            return
        if resampler is not None:
            pending.extend(resampler.flush())
        self._send(EngineAudio(job.job_id, bytes(pending), final=True))


def main() -> None:
    config = load_config(EngineProcessConfig)
    configure_logging("tts", config.replica, config.log_level)
    if not config.engine_addr:
        sys.exit("tts engine: MESHSERVE_ENGINE_ADDR is not set (started outside a tts replica?)")
    engine = load_engine(config.engine)
    engine.load()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socket = ctx.socket(zmq.PAIR)
    socket.setsockopt(zmq.LINGER, 0)
    if config.curve_dir:
        load_keys(Path(config.curve_dir)).connect(socket)
    socket.connect(config.engine_addr)
    log.info("engine loaded", engine=engine.name, slot=config.engine_slot, pid=os.getpid())
    try:
        EngineServer(engine, socket).serve_forever()
    finally:
        socket.close(linger=0)
        ctx.term()
        engine.close()


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group; the replica decides when engines stop.
    with contextlib.suppress(KeyboardInterrupt):
        main()
