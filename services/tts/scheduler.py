"""The TTS scheduler: which text chunk runs on which engine slot next, in what order
audio goes out, and when an engine that ignores a cancel must go. Pure: no I/O, no
clock (callers pass ``now``).

    SpeechRequest ─split─▶ chunks c0 c1 c2 …      slots: [ A.c3 ] [ B.c0 ] [ idle ]
                                    │                               ▲
          queued chunks of all requests ─── pick (first chunks first, then EDF) ─┘

Policy:
- A request's first chunk goes ahead of every later chunk of older requests: time to
  first audio is what a listener waits on; later chunks only have to stay ahead of
  playback. Later chunks run earliest playback deadline first, the deadline being
  the request's arrival plus an estimate of the audio before the chunk.
- Chunks of one request may run on several slots at once; audio is released strictly
  in chunk order, each chunk's audio as soon as it arrives once the chunks before it
  are out (the rest waits in the request, bounded by the request's input).
- Admission is bounded (``max_requests``): beyond it a request is answered busy.
- Cancel is batched and idempotent: queued chunks vanish at once, running ones are
  reported for the caller to abort at the engine, and the slot stays taken until the
  engine confirms, so an engine is never handed two jobs. Ids cancelled before they
  arrived are remembered (bounded) and their request is dropped on arrival.
- An abort the engine has not confirmed ``cancel_grace_s`` after it was sent is
  overdue (``overdue_aborts``): the caller restarts that engine, the only way left
  to free its slot.
- A job lost with its engine is re-queued (``max_attempts``); audio already released
  or held for a chunk is not repeated by the retry, which is spliced in at the same
  sample offset (espeak-ng repeats itself to within a few samples, so the seam is off
  by well under a millisecond).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import IntEnum

from shared.protocol.speech import SpeechRequest
from shared.recent_ids import RecentIds

# Speech rate of the playback-deadline estimate (espeak-ng at 175 wpm speaks ~15
# characters a second). Only the order of deadlines matters, not their accuracy.
CHARS_PER_SECOND = 15.0


class ChunkState(IntEnum):
    QUEUED = 0
    RUNNING = 1
    DONE = 2


class Admission(IntEnum):
    ADMITTED = 0
    DUPLICATE = 1  # already here: a re-sent request, ignored
    CANCELLED = 2  # cancelled before it arrived: dropped without an answer
    BUSY = 3  # no room: answer busy


@dataclass(slots=True)
class ChunkProgress:
    index: int
    text: str
    deadline: float
    state: ChunkState = ChunkState.QUEUED
    attempts: int = 0
    received: int = 0  # bytes the current attempt produced so far
    kept: int = 0  # bytes of this chunk already released or held (survives retries)
    held: list[bytes] = field(default_factory=list)  # audio waiting for earlier chunks


@dataclass(slots=True)
class RequestProgress:
    request: SpeechRequest
    arrival: int  # admission order, the last tie-breaker
    chunks: list[ChunkProgress]
    queued: list[int]  # indices of queued chunks, sorted
    head: int = 0  # first chunk whose audio is not fully released
    seq: int = 0  # next SpeechChunk seq
    bytes_released: int = 0
    running: dict[int, int] = field(default_factory=dict)  # chunk index -> job id

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True, slots=True)
class SpeechJob:
    """One chunk to synthesize in one slot."""

    job_id: int
    slot: int
    request_id: str
    chunk_index: int
    text: str
    voice: str
    speed: float
    sample_rate: int


@dataclass(frozen=True, slots=True)
class AudioRelease:
    """Audio for the client, in order; ``sample_offset`` counts samples before it."""

    request_id: str
    seq: int
    pcm: bytes
    sample_offset: int
    final: bool


@dataclass(frozen=True, slots=True)
class RequestFailure:
    request_id: str
    status: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class JobAbort:
    """Abort ``job_id`` on ``slot``'s engine; the slot frees when the engine confirms."""

    slot: int
    job_id: int


@dataclass(slots=True)
class SchedulerOutput:
    releases: list[AudioRelease] = field(default_factory=list)
    failures: list[RequestFailure] = field(default_factory=list)
    aborts: list[JobAbort] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # completed (final released)


@dataclass(slots=True)
class Slot:
    ready: bool = False
    job: SpeechJob | None = None
    cancelling: bool = False  # its job was aborted; waiting for the engine's final
    abort_deadline: float | None = None  # the engine must confirm the abort by then

    @property
    def idle(self) -> bool:
        return self.ready and self.job is None

    def reset(self, *, ready: bool) -> None:
        self.ready, self.job, self.cancelling, self.abort_deadline = ready, None, False, None


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    slots: int
    slots_ready: int
    slots_busy: int
    requests: int
    queued_chunks: int
    running_chunks: int
    completed: int
    cancelled: int
    cancelled_running: int
    busy_rejections: int


class TtsScheduler:
    """Chunks of every admitted request over ``slots`` engine slots."""

    def __init__(
        self,
        slots: int,
        max_requests: int,
        *,
        max_attempts: int = 3,
        remembered_cancels: int = 4096,
        cancel_grace_s: float = 2.0,
    ) -> None:
        if slots < 1 or max_requests < 1:
            raise ValueError("a tts scheduler needs at least one slot and one request")
        self.slots = [Slot() for _ in range(slots)]
        self.max_requests = max_requests
        self.max_attempts = max_attempts
        self.cancel_grace_s = cancel_grace_s
        self._requests: dict[str, RequestProgress] = {}
        self._cancelled_early: RecentIds[str] = RecentIds(remembered_cancels)
        self._arrivals = 0
        self._job_ids = 0
        self.completed = 0
        self.cancelled = 0
        self.cancelled_running = 0
        self.busy_rejections = 0

    # ------------------------------------------------------------ admission

    def submit(self, request: SpeechRequest, chunk_texts: list[str], now: float) -> Admission:
        """Queue ``request`` split into ``chunk_texts`` (non-empty)."""
        assert chunk_texts, "the caller rejects requests with nothing to say"
        request_id = request.request_id
        if request_id in self._requests:
            return Admission.DUPLICATE
        if self._cancelled_early.discard(request_id):
            return Admission.CANCELLED
        if len(self._requests) >= self.max_requests:
            self.busy_rejections += 1
            return Admission.BUSY
        speed = request.speed if request.speed > 0 else 1.0
        chunks: list[ChunkProgress] = []
        audio_before = 0.0
        for index, text in enumerate(chunk_texts):
            chunks.append(ChunkProgress(index, text, now + audio_before))
            audio_before += len(text) / (CHARS_PER_SECOND * speed)
        self._arrivals += 1
        self._requests[request_id] = RequestProgress(
            request, self._arrivals, chunks, list(range(len(chunks)))
        )
        return Admission.ADMITTED

    # ------------------------------------------------------------- dispatch

    def _next_chunk(self) -> RequestProgress | None:
        best: RequestProgress | None = None
        best_key: tuple[int, float, int] | None = None
        for progress in self._requests.values():
            if not progress.queued:
                continue
            chunk = progress.chunks[progress.queued[0]]
            key = (0 if chunk.index == 0 else 1, chunk.deadline, progress.arrival)
            if best_key is None or key < best_key:
                best, best_key = progress, key
        return best

    def schedule(self) -> list[SpeechJob]:
        """Jobs for every idle slot, best chunk first; mark them running."""
        jobs: list[SpeechJob] = []
        for slot_index, slot in enumerate(self.slots):
            if not slot.idle:
                continue
            progress = self._next_chunk()
            if progress is None:
                break
            chunk = progress.chunks[progress.queued.pop(0)]
            chunk.state = ChunkState.RUNNING
            chunk.attempts += 1
            chunk.received = 0
            self._job_ids += 1
            request = progress.request
            job = SpeechJob(
                self._job_ids, slot_index, request.request_id, chunk.index, chunk.text,
                request.voice, request.speed, request.sample_rate,
            )
            progress.running[chunk.index] = job.job_id
            slot.job = job
            jobs.append(job)
        return jobs

    # ---------------------------------------------------------------- audio

    def on_audio(
        self,
        slot_index: int,
        job_id: int,
        pcm: bytes,
        *,
        final: bool,
        cancelled: bool = False,
        error: str | None = None,
    ) -> SchedulerOutput:
        """Audio from the job in ``slot_index``; stale job ids are ignored."""
        out = SchedulerOutput()
        slot = self.slots[slot_index]
        job = slot.job
        if job is None or job.job_id != job_id:
            return out
        if final:
            if slot.cancelling and cancelled:
                self.cancelled_running += 1
            slot.reset(ready=slot.ready)
        progress = self._requests.get(job.request_id)
        if progress is None or progress.running.get(job.chunk_index) != job_id:
            return out  # its request was cancelled or failed meanwhile
        chunk = progress.chunks[job.chunk_index]
        if error is not None or cancelled:
            del progress.running[job.chunk_index]
            reason = error or "the engine stopped the chunk on its own"
            self._fail(progress, 500, "engine_error", f"synthesis failed: {reason}", out)
            return out
        start, chunk.received = chunk.received, chunk.received + len(pcm)
        if chunk.received > chunk.kept:
            # Only what a previous attempt did not already produce.
            fresh = pcm[max(0, chunk.kept - start):]
            chunk.kept = chunk.received
            chunk.held.append(fresh)
        if final:
            del progress.running[job.chunk_index]
            chunk.state = ChunkState.DONE
        self._release(progress, out)
        return out

    def _release(self, progress: RequestProgress, out: SchedulerOutput) -> None:
        """Release held audio from the head chunk on, in chunk order."""
        released_before = len(out.releases)
        while progress.head < len(progress.chunks):
            chunk = progress.chunks[progress.head]
            for pcm in chunk.held:
                if pcm:
                    self._emit(progress, pcm, out)
            chunk.held.clear()
            if chunk.state is not ChunkState.DONE:
                return
            progress.head += 1
        # Every chunk is out: the last release of this call (or an empty one) is final.
        last = out.releases[-1] if len(out.releases) > released_before else None
        if last is not None and last.request_id == progress.request_id:
            out.releases[-1] = AudioRelease(
                last.request_id, last.seq, last.pcm, last.sample_offset, final=True
            )
        else:
            self._emit(progress, b"", out, final=True)
        del self._requests[progress.request_id]
        self.completed += 1
        out.finished.append(progress.request_id)

    def _emit(
        self, progress: RequestProgress, pcm: bytes, out: SchedulerOutput, final: bool = False
    ) -> None:
        out.releases.append(
            AudioRelease(
                progress.request_id, progress.seq, pcm, progress.bytes_released // 2, final
            )
        )
        progress.seq += 1
        progress.bytes_released += len(pcm)

    # ---------------------------------------------------------- cancellation

    def _abort_running(self, progress: RequestProgress, out: SchedulerOutput) -> None:
        for job_id in progress.running.values():
            for slot_index, slot in enumerate(self.slots):
                if slot.job is not None and slot.job.job_id == job_id:
                    slot.cancelling = True
                    out.aborts.append(JobAbort(slot_index, job_id))
        progress.running.clear()

    def _fail(
        self, progress: RequestProgress, status: int, code: str, message: str,
        out: SchedulerOutput,
    ) -> None:
        self._abort_running(progress, out)
        del self._requests[progress.request_id]
        out.failures.append(RequestFailure(progress.request_id, status, code, message))

    def cancel(self, request_ids: list[str]) -> SchedulerOutput:
        """Drop these requests; running chunks come back as ``aborts``."""
        out = SchedulerOutput()
        for request_id in request_ids:
            progress = self._requests.pop(request_id, None)
            if progress is None:
                self._cancelled_early.add(request_id)
                continue
            self.cancelled += 1
            self._abort_running(progress, out)
        return out

    # ------------------------------------------------------ abort deadlines

    def abort_sent(self, abort: JobAbort, now: float) -> None:
        """``abort`` reached its engine at ``now``: it has ``cancel_grace_s`` to confirm."""
        slot = self.slots[abort.slot]
        if slot.cancelling and slot.job is not None and slot.job.job_id == abort.job_id:
            slot.abort_deadline = now + self.cancel_grace_s

    def next_abort_deadline(self) -> float | None:
        """The soonest deadline of an unconfirmed abort, None when there is none."""
        return min((s.abort_deadline for s in self.slots if s.abort_deadline is not None),
                   default=None)

    def overdue_aborts(self, now: float) -> list[JobAbort]:
        """Aborts their engine has not confirmed in time, each reported once: the
        caller restarts those engines (``slot_lost`` follows)."""
        overdue = []
        for index, slot in enumerate(self.slots):
            if slot.abort_deadline is not None and slot.abort_deadline <= now:
                assert slot.job is not None, "a deadline outlives its job only by a bug"
                slot.abort_deadline = None
                overdue.append(JobAbort(index, slot.job.job_id))
        return overdue


    # ---------------------------------------------------------------- slots

    def slot_ready(self, slot_index: int) -> None:
        self.slots[slot_index].reset(ready=True)

    def slot_lost(self, slot_index: int) -> SchedulerOutput:
        """The slot's engine is gone: re-queue its chunk, or fail a request whose
        chunk keeps killing engines."""
        out = SchedulerOutput()
        slot = self.slots[slot_index]
        job = slot.job
        slot.reset(ready=False)
        if job is None:
            return out
        progress = self._requests.get(job.request_id)
        if progress is None or progress.running.get(job.chunk_index) != job.job_id:
            return out
        del progress.running[job.chunk_index]
        chunk = progress.chunks[job.chunk_index]
        if chunk.attempts >= self.max_attempts:
            self._fail(
                progress, 500, "engine_error",
                f"the engine died {chunk.attempts} times on chunk {chunk.index}", out,
            )
            return out
        chunk.state = ChunkState.QUEUED
        bisect.insort(progress.queued, chunk.index)
        return out

    def job_in(self, slot_index: int) -> SpeechJob | None:
        return self.slots[slot_index].job

    # ---------------------------------------------------------------- stats

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            slots=len(self.slots),
            slots_ready=sum(slot.ready for slot in self.slots),
            slots_busy=sum(slot.job is not None for slot in self.slots),
            requests=len(self._requests),
            queued_chunks=sum(len(p.queued) for p in self._requests.values()),
            running_chunks=sum(len(p.running) for p in self._requests.values()),
            completed=self.completed,
            cancelled=self.cancelled,
            cancelled_running=self.cancelled_running,
            busy_rejections=self.busy_rejections,
        )
