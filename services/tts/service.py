"""The tts replica's actor: a thin shell around ``TtsScheduler`` and an ``EngineBackend``.

Validation is ``shared.protocol.speech.request_problem``, scheduling, ordering and
abort deadlines are the scheduler's, spans are ``SpeechTraces``'; the actor turns
messages and engine events into their calls and their outputs into messages.

It connects a DealerEndpoint to the api's speech ROUTER (hello with capacity =
engines, ready once an engine is up), and serves one merged, bounded event stream:
messages from the api, and audio and slot changes from the engines. Each event is
turned into scheduler calls, and the scheduler's output into messages: audio and
failures to the api, jobs and aborts to the engines.

    api ─SpeechRequest/Cancel─▶ ┐                  ┌─▶ EngineSynthesize/Cancel ─▶ engines
                                ├─ events ─ actor ─┤
    engines ─EngineAudio/slot─▶ ┘                  └─▶ SpeechChunk/Failed ─▶ api

An engine that does not confirm a cancel within ``cancel_grace_s`` (the scheduler
says which are overdue) is killed (its slot restarts). When the api goes away or
restarts, every request is cancelled: a new api incarnation re-sends what it still
wants.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from shutil import rmtree

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry.context import Context

from services.tts.chunking import split_text
from services.tts.config import TtsConfig
from services.tts.engine_pool import EngineProcessPool
from services.tts.engines.base import BackendEvent, EngineBackend, SlotAudio, SlotLost, SlotReady
from services.tts.scheduler import Admission, SchedulerOutput, SpeechJob, TtsScheduler
from services.tts.tracing import SpeechTraces
from shared.config import load_config
from shared.endpoints import connect_dealer
from shared.logs import get_logger
from shared.mesh import DealerEndpoint, Received, UpstreamJoined, UpstreamLost
from shared.protocol.common import Hello, Rejected
from shared.protocol.speech import (
    EngineSynthesize,
    SpeechCancel,
    SpeechCatalog,
    SpeechCatalogRequest,
    SpeechChunk,
    SpeechFailed,
    SpeechFromTts,
    SpeechRequest,
    SpeechStatus,
    SpeechStatusRequest,
    SpeechToTts,
    request_problem,
)
from shared.service import ServiceRuntime

log = get_logger("meshserve.tts")

EVENT_QUEUE = 1024

ActorEvent = Received[SpeechToTts] | UpstreamJoined | UpstreamLost | BackendEvent


class TtsActor:
    """One tts replica: api messages in, engine jobs out, audio back."""

    def __init__(self, runtime: ServiceRuntime, config: TtsConfig, backend: EngineBackend) -> None:
        self.runtime = runtime
        self.config = config
        self.backend = backend
        self.scheduler = TtsScheduler(backend.slots, config.max_queued_requests,
                                      cancel_grace_s=config.cancel_grace_s)
        self.catalog: SpeechCatalog | None = None
        self.traces = SpeechTraces()
        self._announced = False
        self.dealer: DealerEndpoint[SpeechToTts] = connect_dealer(
            runtime, runtime.addresses.speech_addr, SpeechToTts, hello=self._hello
        )
        runtime.capacity = backend.slots

    @property
    def ready(self) -> bool:
        return self.catalog is not None and any(slot.ready for slot in self.scheduler.slots)

    def _hello(self) -> Hello:
        return self.runtime.identity.hello(ready=self.ready, capacity=self.backend.slots)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[ActorEvent](EVENT_QUEUE)
        async with anyio.create_task_group() as tg:
            await tg.start(self.backend.run, send.clone())
            await tg.start(self.dealer.run)
            tg.start_soon(self._forward_mesh, send)
            task_status.started()
            await self._serve(receive)

    async def _forward_mesh(self, events: MemoryObjectSendStream[ActorEvent]) -> None:
        async with events:
            async for event in self.dealer.inbox:
                await events.send(event)

    async def _serve(self, events: MemoryObjectReceiveStream[ActorEvent]) -> None:
        async with events:
            while True:
                event: ActorEvent | None = None
                # Timing out on the stream (never on a socket recv) to enforce cancels.
                with anyio.move_on_after(self._until_next_abort_deadline()):
                    event = await events.receive()
                if event is None:
                    self._restart_overdue_engines()
                elif isinstance(event, SlotAudio | SlotReady | SlotLost):
                    await self._on_engine(event)
                else:
                    await self._on_mesh(event)
                await self._dispatch()

    async def _on_mesh(self, event: Received[SpeechToTts] | UpstreamJoined | UpstreamLost) -> None:
        match event:
            case Received(body=SpeechRequest() as request):
                await self._on_request(request, event.context)
            case Received(body=SpeechCancel(request_ids=ids, reason=reason)):
                await self._cancel(ids, reason)
            case Received(body=SpeechStatusRequest()):
                await self._send(self.status(), event.context)
            case Received(body=SpeechCatalogRequest()):
                self._announced = False
                await self._announce()
            case UpstreamJoined(restarted=restarted):
                if restarted:
                    # A new api incarnation: whatever we run for the old one has no reader.
                    await self._cancel_everything("api restarted")
                self._announced = False
                await self._announce()
            case UpstreamLost(reason=reason):
                log.warning("api unreachable", reason=reason)
                self._announced = False
                await self._cancel_everything(f"api unreachable: {reason}")
            case Received(body=Rejected(reason=reason)):
                # The api refused something of ours (most often: work sent while it had
                # forgotten us); the dealer already said hello again.
                log.warning("api rejected a message", reason=reason)
            case Received(body=body):
                log.warning("unexpected message", type=type(body).__name__)

    async def _on_engine(self, event: BackendEvent) -> None:
        match event:
            case SlotAudio(slot=slot, audio=audio):
                job = self.scheduler.job_in(slot)
                out = self.scheduler.on_audio(
                    slot, audio.job_id, audio.pcm,
                    final=audio.final, cancelled=audio.cancelled, error=audio.error,
                )
                if audio.final and job is not None and job.job_id == audio.job_id:
                    self.traces.job_ended(job.job_id, cancelled=audio.cancelled,
                                          error=audio.error)
                await self._apply(out)
            case SlotReady(slot=slot, info=info):
                self.scheduler.slot_ready(slot)
                if self.catalog is None:
                    self.catalog = SpeechCatalog(
                        engine=info.engine,
                        sample_rate=info.sample_rate,
                        models=info.models,
                        voices=info.voices,
                        max_input_chars=self.config.max_input_chars,
                    )
                log.info("engine ready", slot=slot, pid=info.pid, engine=info.engine)
                await self._readiness_changed()
                await self._announce()
            case SlotLost(slot=slot, reason=reason):
                job = self.scheduler.job_in(slot)
                log.warning("engine lost", slot=slot, reason=reason)
                if job is not None:
                    self.traces.job_ended(job.job_id, cancelled=False, error=reason)
                out = self.scheduler.slot_lost(slot)
                await self._readiness_changed()
                await self._apply(out)

    # -------------------------------------------------------------- requests

    async def _on_request(self, request: SpeechRequest, received: Context) -> None:
        request_id = request.request_id
        if self.catalog is None:
            await self._fail(request_id, 503, "service_unavailable", "tts engines are starting",
                             received)
            return
        problem = request_problem(request, self.catalog, self.config.max_input_chars)
        chunks = split_text(request.input, self.config.max_chunk_chars) if problem is None else []
        if problem is None and not chunks:
            problem = "input has nothing to speak"
        if problem is not None:
            log.info("speech request rejected", request_id=request_id, reason=problem)
            await self._fail(request_id, 400, "invalid_request_error", problem, received)
            return
        admission = self.scheduler.submit(request, [c.text for c in chunks], time.monotonic())
        if admission is Admission.BUSY:
            await self._fail(
                request_id, 429, "server_busy",
                f"tts replica {self.runtime.identity.replica} is serving its limit of "
                f"{self.config.max_queued_requests} requests",
                received,
            )
            return
        if admission is not Admission.ADMITTED:
            log.debug("speech request dropped", request_id=request_id, why=admission.name)
            return
        self.traces.admitted(
            request, received, model=request.model or self.catalog.engine,
            sample_rate=request.sample_rate or self.catalog.sample_rate, chunks=len(chunks),
        )

    async def _cancel(self, request_ids: list[str], reason: str) -> None:
        out = self.scheduler.cancel(request_ids)
        for request_id in request_ids:
            self.traces.cancelled(request_id, reason)
        await self._apply(out)

    async def _cancel_everything(self, reason: str) -> None:
        await self._cancel(self.traces.request_ids(), reason)

    async def _fail(
        self, request_id: str, status: int, code: str, message: str, ctx: Context
    ) -> None:
        await self._send(SpeechFailed(request_id, status, code, message), ctx)

    # ------------------------------------------------------------ scheduling

    async def _dispatch(self) -> None:
        for job in self.scheduler.schedule():
            await self._start_job(job)

    async def _start_job(self, job: SpeechJob) -> None:
        rate = job.sample_rate or (self.catalog.sample_rate if self.catalog else 0)
        self.traces.job_started(job)
        await self.backend.start_job(
            job.slot,
            EngineSynthesize(
                job_id=job.job_id,
                text=job.text,
                voice=job.voice,
                speed=job.speed,
                sample_rate=job.sample_rate,
                piece_samples=max(1, rate * self.config.piece_ms // 1000),
            ),
        )

    async def _apply(self, out: SchedulerOutput) -> None:
        for abort in out.aborts:
            await self.backend.cancel_job(abort.slot, abort.job_id)
            self.scheduler.abort_sent(abort, time.monotonic())
        for release in out.releases:
            traced = self.traces.released(release)
            if traced is None:
                continue
            await self._send(
                SpeechChunk(
                    request_id=release.request_id,
                    seq=release.seq,
                    pcm=release.pcm,
                    sample_rate=traced.sample_rate,
                    final=release.final,
                    sample_offset=release.sample_offset,
                ),
                traced.context,
            )
        for request_id in out.finished:
            self.traces.finished(request_id)
        for failure in out.failures:
            log.warning("speech request failed", request_id=failure.request_id,
                        reason=failure.message)
            await self._send(
                SpeechFailed(failure.request_id, failure.status, failure.code, failure.message),
                self.traces.failed(failure.request_id, failure.message),
            )

    def _until_next_abort_deadline(self) -> float:
        deadline = self.scheduler.next_abort_deadline()
        return math.inf if deadline is None else max(0.0, deadline - time.monotonic())

    def _restart_overdue_engines(self) -> None:
        for abort in self.scheduler.overdue_aborts(time.monotonic()):
            # The fallback: the engine ignored the cancel, so its process goes.
            self.backend.restart(abort.slot, f"job {abort.job_id} not stopped within "
                                             f"{self.config.cancel_grace_s} s of its cancel")

    # ------------------------------------------------------------------ mesh

    async def _readiness_changed(self) -> None:
        """Tell the api (and the supervisor) at once, not at the next beat: the api
        must see ``ready`` in our hello before the catalog that follows it."""
        if self.runtime.ready != self.ready:
            self.runtime.ready = self.ready
            await self.dealer.say_hello()

    async def _announce(self) -> None:
        if self.catalog is not None and self.dealer.connected and not self._announced:
            self._announced = True
            await self._send(self.catalog, None)

    async def _send(self, body: SpeechFromTts, ctx: Context | None) -> None:
        await self.dealer.send(body, ctx)

    def status(self) -> SpeechStatus:
        stats = self.scheduler.stats()
        return SpeechStatus(
            engines=stats.slots,
            engines_ready=stats.slots_ready,
            engines_busy=stats.slots_busy,
            requests=stats.requests,
            queued_chunks=stats.queued_chunks,
            running_chunks=stats.running_chunks,
            completed=stats.completed,
            cancelled=stats.cancelled,
            cancelled_running=stats.cancelled_running,
            busy_rejections=stats.busy_rejections,
            engine_restarts=self.backend.restarts,
            engine_pids=self.backend.pids(),
        )


WORKDIR_ROOT = Path("/tmp")
WORKDIR_PREFIX = "ms-tts-"


def sweep_dead_workdirs(root: Path) -> list[Path]:
    """Remove ``ms-tts-<pid>-*`` folders under ``root`` whose tts process is gone
    (killed, so its own cleanup never ran); returns what was removed."""
    removed = []
    for folder in root.glob(f"{WORKDIR_PREFIX}*-*"):
        pid = folder.name.removeprefix(WORKDIR_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, and not ours to sweep
    return True


async def main(runtime: ServiceRuntime) -> None:
    config = load_config(TtsConfig)
    if config.engines < 1:
        raise ValueError(f"MESHSERVE_ENGINES must be at least 1, got {config.engines}")
    # ipc paths must stay short (unix sockets: ~107 bytes), hence /tmp. The pid in
    # the name lets a later tts sweep the folder of one that was killed (its
    # `finally` never ran) instead of leaving its sockets behind for good.
    sweep_dead_workdirs(WORKDIR_ROOT)
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=WORKDIR_ROOT))
    try:
        pool = EngineProcessPool(
            runtime.zmq,
            engine=config.engine,
            slots=config.engines,
            workdir=workdir,
            replica=runtime.identity.replica,
            start_timeout_s=config.engine_start_timeout_s,
            log_level=runtime.process.log_level,
            auth=runtime.auth,
        )
        await TtsActor(runtime, config, pool).run()
    finally:
        rmtree(workdir, ignore_errors=True)
