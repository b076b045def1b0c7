"""The tts service alone, at the message level: a real ``python -m services.tts``
replica with real engine processes, driven by the test playing the api (a real
ROUTER on an ipc socket). Ordering, chunking, first-chunk priority, busy on overflow,
cancellation of queued and running requests, engine crash recovery, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import numpy as np
import pytest
import zmq
import zmq.asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.tts.chunking import split_text
from services.tts.config import TtsConfig
from services.tts.engine_pool import EngineProcessPool
from services.tts.engines.espeak import EspeakEngine
from services.tts.service import TtsActor
from shared.config import MeshAddresses, ProcessConfig
from shared.mesh import Identity, Peer, PeerJoined, Received, RouterEndpoint
from shared.protocol.speech import (
    SpeechCancel,
    SpeechCatalog,
    SpeechChunk,
    SpeechFailed,
    SpeechFromTts,
    SpeechRequest,
    SpeechStatus,
    SpeechStatusRequest,
)
from shared.service import ServiceRuntime

pytestmark = pytest.mark.anyio

# Short enough to keep liveness tests quick; long enough that a loaded CI machine
# starving the test process for a few hundred ms does not read as a dead peer (the
# replica then cancels everything: at 0.1 s this flaked under load).
HEARTBEAT_S = 0.3
REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ processes


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers (engines included)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    with suppress(ProcessLookupError):  # engines share the replica's group
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def tts_replica(
    ipc_dir: Path, replica: int = 0, **settings: object
) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHSERVE_", "OTEL_"))}
    env.update(
        MESHSERVE_SPEECH_ADDR=f"ipc://{ipc_dir}/speech.sock",
        MESHSERVE_HEARTBEAT_S=str(HEARTBEAT_S),
        MESHSERVE_REPLICA=str(replica),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.update({f"MESHSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    with open(ipc_dir / f"tts-{replica}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.tts"], env=env, cwd=REPO_ROOT,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            yield proc
        finally:
            _stop(proc)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


# ----------------------------------------------------------- the test as the api


@dataclass
class ApiSide:
    """The test's ROUTER at the speech address, recording everything tts replicas send."""

    router: RouterEndpoint[SpeechFromTts]
    ctx: zmq.asyncio.Context
    messages: list[SpeechFromTts] = field(default_factory=list)
    envelopes: list[Received[SpeechFromTts]] = field(default_factory=list)
    peers: dict[str, Peer] = field(default_factory=dict)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    async def _record(self) -> None:
        async for event in self.router.inbox:
            if isinstance(event, PeerJoined):
                self.peers[event.peer.name] = event.peer
            elif isinstance(event, Received):
                self.messages.append(event.body)
                self.envelopes.append(event)
            self._changed.set()
            self._changed = anyio.Event()

    async def until(self, condition: Callable[[], object], timeout: float = 20.0) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                await self._changed.wait()

    async def ready_replica(self, name: str = "tts/0") -> Peer:
        def ready() -> bool:
            peer = self.peers.get(name)
            return peer is not None and peer.hello.ready and any(
                isinstance(m, SpeechCatalog) for m in self.messages
            )

        await self.until(ready, timeout=60)
        return self.peers[name]

    def chunks(self, request_id: str) -> list[SpeechChunk]:
        return [m for m in self.messages
                if isinstance(m, SpeechChunk) and m.request_id == request_id]

    def failure(self, request_id: str) -> SpeechFailed | None:
        return next((m for m in self.messages
                     if isinstance(m, SpeechFailed) and m.request_id == request_id), None)

    def finished(self, request_id: str) -> bool:
        chunks = self.chunks(request_id)
        return bool(chunks and chunks[-1].final) or self.failure(request_id) is not None

    async def speak(self, peer: Peer, request_id: str, text: str, **fields: object) -> None:
        voice = str(fields.pop("voice", "alloy"))
        await self.router.send(peer, SpeechRequest(request_id, text, voice, **fields))

    async def complete(self, peer: Peer, request_id: str, text: str, **fields: object) -> bytes:
        await self.speak(peer, request_id, text, **fields)
        await self.until(lambda: self.finished(request_id))
        assert self.failure(request_id) is None, self.failure(request_id)
        return b"".join(c.pcm for c in self.chunks(request_id))

    async def status(self, peer: Peer) -> SpeechStatus:
        seen = sum(isinstance(m, SpeechStatus) for m in self.messages)
        await self.router.send(peer, SpeechStatusRequest())
        await self.until(lambda: sum(isinstance(m, SpeechStatus) for m in self.messages) > seen)
        return [m for m in self.messages if isinstance(m, SpeechStatus)][-1]


@asynccontextmanager
async def api_side(ipc_dir: Path) -> AsyncIterator[ApiSide]:
    ctx = zmq.asyncio.Context()
    router: RouterEndpoint[SpeechFromTts] = RouterEndpoint(
        ctx, f"ipc://{ipc_dir}/speech.sock", Identity("api", 0), SpeechFromTts,
        heartbeat_s=HEARTBEAT_S,
    )
    side = ApiSide(router, ctx)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(router.run)
            tg.start_soon(side._record)
            yield side
            tg.cancel_scope.cancel()
    finally:
        router.close()
        ctx.destroy(linger=0)


# ----------------------------------------------------------------- references

_engine: EspeakEngine | None = None


def reference_chunk_samples(text: str, voice: str = "alloy", max_chars: int = 300) -> list[int]:
    """Samples per chunk as the engine makes them in this process (native rate)."""
    global _engine
    if _engine is None:
        _engine = EspeakEngine()
        _engine.load()
    lengths = []
    for chunk in split_text(text, max_chars):
        samples = 0

        def count(pcm: bytes) -> bool:
            nonlocal samples
            samples += len(pcm) // 2
            return True

        _engine.synthesize(chunk.text, voice, 1.0, count)
        lengths.append(samples)
    return lengths


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


def sentences(count: int) -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return " ".join(" ".join(words[: 1 + i % len(words)]).capitalize() + "." for i in range(count))


# ---------------------------------------------------------------------- tests

NO_SPLIT_PIECES = 600_000  # piece_ms: one SpeechChunk per text chunk


async def test_replica_announces_itself_and_streams_chunks_in_order(ipc_dir: Path) -> None:
    text = ("Hi. The quick brown fox jumps over the lazy dog near the bank of the river. "
            "Yes indeed. Then it ran all the way home, through the fields and the forest. Ok.")
    async with api_side(ipc_dir) as api:
        with tts_replica(ipc_dir, engines=2, piece_ms=NO_SPLIT_PIECES):
            peer = await api.ready_replica()
            assert peer.hello.capacity == 2
            catalog = next(m for m in api.messages if isinstance(m, SpeechCatalog))
            assert catalog.engine == "espeak-ng" and catalog.sample_rate == 22050
            assert {"alloy", "nova", "en-gb"} <= {v.name for v in catalog.voices}

            pcm = await api.complete(peer, "r1", text)
            chunks = api.chunks("r1")
            # One SpeechChunk per sentence, in order though two engines ran them.
            expected = reference_chunk_samples(text)
            got = [len(c.pcm) // 2 for c in chunks]
            assert len(got) == len(expected) == 5
            for g, e in zip(got, expected, strict=True):
                assert abs(g - e) <= 0.01 * e + 50, (got, expected)
            assert [c.seq for c in chunks] == list(range(5))
            assert [c.final for c in chunks] == [False] * 4 + [True]
            offsets = np.cumsum([0, *got[:-1]]).tolist()
            assert [c.sample_offset for c in chunks] == offsets
            assert {c.sample_rate for c in chunks} == {22050}
            assert rms(pcm) > 300


async def test_pieces_are_resampled_and_streamed_within_a_long_chunk(ipc_dir: Path) -> None:
    text = "one two three four five six seven eight nine ten " * 12  # a single chunk
    async with api_side(ipc_dir) as api:
        with tts_replica(ipc_dir, engines=1, piece_ms=500, max_chunk_chars=10_000):
            peer = await api.ready_replica()
            pcm = await api.complete(peer, "r", text, sample_rate=24000)
            chunks = api.chunks("r")
            assert all(len(c.pcm) == 24000 for c in chunks[:-1])  # 0.5 s pieces
            assert len(chunks) > 10 and {c.sample_rate for c in chunks} == {24000}
            [native] = reference_chunk_samples(text, max_chars=10_000)
            assert abs(len(pcm) // 2 - native * 24000 / 22050) < 0.01 * native


async def test_first_chunk_of_a_new_request_goes_before_old_later_chunks(ipc_dir: Path) -> None:
    async with api_side(ipc_dir) as api:
        with tts_replica(ipc_dir, engines=1, piece_ms=NO_SPLIT_PIECES):
            peer = await api.ready_replica()
            await api.speak(peer, "old", sentences(300))
            await api.speak(peer, "new", "Hello there.")
            await api.until(lambda: api.finished("new"))
            old_before_new = len(api.chunks("old"))
            await api.until(lambda: api.finished("old"))
            # "new" was served after at most a few of old's 300 chunks, not after all.
            assert old_before_new < 50, old_before_new
            assert len(api.chunks("old")) == 300
            assert [c.final for c in api.chunks("new")] == [True]


async def test_overflow_is_answered_busy(ipc_dir: Path) -> None:
    async with api_side(ipc_dir) as api:
        with tts_replica(ipc_dir, engines=1, max_queued_requests=2,
                         piece_ms=NO_SPLIT_PIECES):
            peer = await api.ready_replica()
            await api.speak(peer, "a", sentences(400))
            await api.speak(peer, "b", sentences(400))
            await api.speak(peer, "c", "One too many.")
            await api.until(lambda: api.failure("c") is not None)
            failure = api.failure("c")
            assert failure is not None and (failure.status, failure.code) == (429, "server_busy")
            await api.router.send(peer, SpeechCancel(["a", "b"]))
            # Room again once the others are gone.
            assert len(await api.complete(peer, "d", "Now there is room.")) > 0
            status = await api.status(peer)
            assert (status.busy_rejections, status.requests, status.cancelled) == (1, 0, 2)


async def test_cancel_reaches_queued_and_running_requests_and_frees_the_engine(
    ipc_dir: Path,
) -> None:
    # One chunk of ~40 minutes of speech: seconds of synthesis, streamed in 0.2 s pieces.
    huge = " ".join(["the quick brown fox jumps over the lazy dog"] * 900)
    async with api_side(ipc_dir) as api:
        with tts_replica(ipc_dir, engines=1, piece_ms=200, max_chunk_chars=100_000,
                         max_input_chars=100_000):
            peer = await api.ready_replica()
            pids_before = (await api.status(peer)).engine_pids
            await api.speak(peer, "running", huge)
            await api.speak(peer, "queued", "I wait behind the long one.")
            await api.until(lambda: len(api.chunks("running")) > 0)  # it is synthesizing
            cancelled_at = time.monotonic()
            await api.router.send(peer, SpeechCancel(["queued"]))
            await api.router.send(peer, SpeechCancel(["running", "running"]))  # idempotent
            pcm = await api.complete(peer, "after", "The engine is free again.")
            freed_in = time.monotonic() - cancelled_at
            assert len(pcm) > 0
            assert api.chunks("queued") == [] and api.failure("queued") is None
            assert not api.chunks("running")[-1].final
            # Nothing of the cancelled request after the next one started.
            first_after = next(i for i, m in enumerate(api.messages)
                               if isinstance(m, SpeechChunk) and m.request_id == "after")
            assert not any(isinstance(m, SpeechChunk) and m.request_id == "running"
                           for m in api.messages[first_after:])
            status = await api.status(peer)
            assert (status.requests, status.queued_chunks, status.running_chunks,
                    status.engines_busy) == (0, 0, 0, 0)
            assert (status.cancelled, status.cancelled_running) == (2, 1)
            # Freed by the synthesis callback, not by killing the engine.
            assert status.engine_restarts == 0 and status.engine_pids == pids_before
            assert freed_in < 5.0


async def test_a_killed_engine_is_restarted_and_its_request_still_completes(
    ipc_dir: Path,
) -> None:
    text = sentences(200)
    async with api_side(ipc_dir) as api:
        with tts_replica(ipc_dir, engines=1, piece_ms=NO_SPLIT_PIECES):
            peer = await api.ready_replica()
            [pid] = (await api.status(peer)).engine_pids
            await api.speak(peer, "r", text)
            await api.until(lambda: len(api.chunks("r")) > 0)
            os.kill(pid, signal.SIGKILL)
            await api.until(lambda: api.finished("r"))
            assert api.failure("r") is None
            chunks = api.chunks("r")
            assert [c.seq for c in chunks] == list(range(len(chunks)))
            total = sum(len(c.pcm) for c in chunks) // 2
            expected = sum(reference_chunk_samples(text))
            assert abs(total - expected) < 0.01 * expected
            status = await api.status(peer)
            assert status.engine_restarts >= 1 and status.engines_ready == 1
            assert status.engine_pids and pid not in status.engine_pids


async def test_bad_requests_get_400_and_garbage_is_survived(ipc_dir: Path) -> None:
    async with api_side(ipc_dir) as api:
        with tts_replica(ipc_dir, engines=1):
            peer = await api.ready_replica()
            bad = {
                "voice": dict(voice="no-such-voice"),
                "empty": dict(),
                "speed": dict(speed=9.0),
                "rate": dict(sample_rate=100),
                "model": dict(model="whisper-1"),
            }
            for name, fields in bad.items():
                await api.speak(peer, name, "" if name == "empty" else "Hello.", **fields)
            await api.until(lambda: all(api.failure(name) for name in bad))
            for name in bad:
                failure = api.failure(name)
                assert failure is not None and failure.status == 400, failure
            # Garbage frames, and a cancel of ids nobody knows: logged, nothing breaks.
            await api.router.socket.send_multipart([peer.identity, b"\x00junk", b"\xff"])
            await api.router.send(peer, SpeechCancel(["nobody"]))
            assert len(await api.complete(peer, "ok", "Still here.")) > 0


async def test_stopping_the_replica_ends_its_engines(ipc_dir: Path) -> None:
    async with api_side(ipc_dir) as api:
        with tts_replica(ipc_dir, engines=2) as proc:
            peer = await api.ready_replica()
            pids = (await api.status(peer)).engine_pids
            assert len(pids) == 2 and all(alive(pid) for pid in pids)
            # SIGTERM to the replica alone (not its group), as a supervisor sends it.
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            # The replica kills and reaps its engines before it exits.
            assert not any(alive(pid) for pid in pids)


async def test_spans_continue_the_callers_trace(ipc_dir: Path) -> None:
    """The actor in this process (its engine still a real subprocess), with an
    in-memory span exporter: request and chunk spans hang below the api's span, and
    the audio carries the request span's context back."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with api_side(ipc_dir) as api, anyio.create_task_group() as tg:
        runtime = ServiceRuntime(
            identity=Identity("tts", 0),
            process=ProcessConfig(heartbeat_s=HEARTBEAT_S),
            addresses=MeshAddresses(speech_addr=f"ipc://{ipc_dir}/speech.sock"),
            zmq=api.ctx,
        )
        workdir = ipc_dir / "engines"
        workdir.mkdir()
        pool = EngineProcessPool(runtime.zmq, engine="espeak-ng", slots=1, workdir=workdir,
                                 replica=0)
        tg.start_soon(TtsActor(runtime, TtsConfig(engines=1), pool).run)
        peer = await api.ready_replica()
        with trace.get_tracer("test").start_as_current_span("POST /v1/audio/speech") as parent:
            await api.complete(peer, "traced", "First sentence. Second sentence.")
        tg.cancel_scope.cancel()
    trace_id = parent.get_span_context().trace_id
    chunk_contexts = {trace.get_current_span(r.context).get_span_context().trace_id
                      for r in api.envelopes if isinstance(r.body, SpeechChunk)}
    assert chunk_contexts == {trace_id}
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    [request_span] = [s for s in spans if s.name == "tts.request"]
    assert request_span.parent is not None
    assert request_span.parent.span_id == parent.get_span_context().span_id
    assert request_span.attributes["gen_ai.operation.name"] == "text_to_speech"
    assert request_span.attributes["meshserve.speech.audio_seconds"] > 0.5
    assert "first_audio" in [event.name for event in request_span.events]
    chunk_spans = [s for s in spans if s.name == "tts.synthesize"]
    assert len(chunk_spans) == 2
    assert all(s.parent is not None and s.parent.span_id == request_span.context.span_id
               for s in chunk_spans)
