"""TtsScheduler, synchronously: priority of first chunks, in-order release across
slots, bounded admission, cancellation of queued and running chunks, engine loss."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.tts.scheduler import (
    Admission,
    AudioRelease,
    SchedulerOutput,
    SpeechJob,
    TtsScheduler,
)
from shared.protocol.speech import SpeechRequest


def make_scheduler(slots: int = 1, max_requests: int = 8, **kwargs: Any) -> TtsScheduler:
    scheduler = TtsScheduler(slots, max_requests, **kwargs)
    for slot in range(slots):
        scheduler.slot_ready(slot)
    return scheduler


def submit(
    scheduler: TtsScheduler, request_id: str, chunks: list[str], now: float = 0.0
) -> Admission:
    request = SpeechRequest(request_id, " ".join(chunks), "alloy")
    return scheduler.submit(request, chunks, now)


def audio_of(text: str, size: int = 8) -> bytes:
    """Deterministic stand-in audio for a chunk: what a deterministic engine returns."""
    return (text.encode() * size)[: size * 2 * max(1, len(text))]


def finish(scheduler: TtsScheduler, job: SpeechJob, pcm: bytes | None = None) -> list[AudioRelease]:
    out = scheduler.on_audio(job.slot, job.job_id, audio_of(job.text) if pcm is None else pcm,
                             final=True)
    assert not out.failures
    return out.releases


def test_first_chunk_of_a_new_request_goes_before_later_chunks_of_old_ones() -> None:
    scheduler = make_scheduler(slots=1)
    submit(scheduler, "old", ["A0.", "A1.", "A2."], now=0.0)
    [job] = scheduler.schedule()
    assert (job.request_id, job.chunk_index) == ("old", 0)
    submit(scheduler, "new", ["B0.", "B1."], now=5.0)
    finish(scheduler, job)
    [job] = scheduler.schedule()
    assert (job.request_id, job.chunk_index) == ("new", 0)
    # Later chunks: earliest playback deadline first (old's A1 is due long before B1).
    finish(scheduler, job)
    order = []
    while (jobs := scheduler.schedule()):
        order.append((jobs[0].request_id, jobs[0].chunk_index))
        finish(scheduler, jobs[0])
    assert order == [("old", 1), ("old", 2), ("new", 1)]


def test_chunks_run_on_several_slots_and_are_released_in_order() -> None:
    scheduler = make_scheduler(slots=3)
    submit(scheduler, "r", ["one.", "two two.", "three three three."])
    jobs = scheduler.schedule()
    assert [j.chunk_index for j in jobs] == [0, 1, 2]
    assert {j.slot for j in jobs} == {0, 1, 2}
    # The last chunk finishes first: nothing may go out before chunk 0.
    assert finish(scheduler, jobs[2]) == []
    mid = scheduler.on_audio(jobs[1].slot, jobs[1].job_id, b"\x01\x00" * 3, final=False)
    assert mid.releases == []
    first = scheduler.on_audio(jobs[0].slot, jobs[0].job_id, b"\x02\x00" * 2, final=False)
    assert [r.pcm for r in first.releases] == [b"\x02\x00" * 2]
    released = finish(scheduler, jobs[0], b"\x03\x00")
    released += finish(scheduler, jobs[1], b"\x04\x00")
    assert [r.seq for r in first.releases + released] == [0, 1, 2, 3, 4]
    assert [r.pcm for r in released] == [
        b"\x03\x00", b"\x01\x00" * 3, b"\x04\x00", audio_of(jobs[2].text)
    ]
    offsets = [r.sample_offset for r in first.releases + released]
    assert offsets == [0, 2, 3, 6, 7]
    assert [r.final for r in released] == [False, False, False, True]
    assert scheduler.stats().requests == 0 and scheduler.stats().completed == 1


def test_an_empty_final_piece_still_ends_the_request() -> None:
    scheduler = make_scheduler()
    submit(scheduler, "r", ["hi."])
    [job] = scheduler.schedule()
    part = scheduler.on_audio(job.slot, job.job_id, b"\x01\x00", final=False)
    end = scheduler.on_audio(job.slot, job.job_id, b"", final=True)
    assert [(r.seq, r.final) for r in part.releases + end.releases] == [(0, False), (1, True)]
    assert end.releases[0].pcm == b"" and end.finished == ["r"]


def test_admission_is_bounded_and_duplicates_are_ignored() -> None:
    scheduler = make_scheduler(max_requests=2)
    assert submit(scheduler, "a", ["x."]) is Admission.ADMITTED
    assert submit(scheduler, "a", ["x."]) is Admission.DUPLICATE
    assert submit(scheduler, "b", ["x."]) is Admission.ADMITTED
    assert submit(scheduler, "c", ["x."]) is Admission.BUSY
    assert scheduler.stats().busy_rejections == 1
    [job] = scheduler.schedule()
    finish(scheduler, job)
    assert submit(scheduler, "c", ["x."]) is Admission.ADMITTED


def test_cancel_of_queued_requests_removes_their_chunks() -> None:
    scheduler = make_scheduler(slots=1)
    submit(scheduler, "running", ["a.", "b."])
    submit(scheduler, "queued", ["c.", "d."])
    [job] = scheduler.schedule()
    out = scheduler.cancel(["queued", "queued", "never-seen"])
    assert out.aborts == [] and out.releases == []
    finish(scheduler, job)
    remaining = []
    while (jobs := scheduler.schedule()):
        remaining.append(jobs[0].request_id)
        finish(scheduler, jobs[0])
    assert remaining == ["running"]
    stats = scheduler.stats()
    assert (stats.requests, stats.queued_chunks, stats.cancelled) == (0, 0, 1)


def test_an_abort_the_engine_does_not_confirm_in_time_is_overdue_once() -> None:
    scheduler = make_scheduler(slots=2, cancel_grace_s=2.0)
    submit(scheduler, "ignored", ["a."])
    submit(scheduler, "confirmed", ["b."])
    first, second = scheduler.schedule()
    out = scheduler.cancel(["ignored", "confirmed"])
    assert scheduler.next_abort_deadline() is None  # nothing sent yet: no clock running
    for abort in out.aborts:
        scheduler.abort_sent(abort, now=10.0)
    assert scheduler.next_abort_deadline() == 12.0
    # One engine confirms in time: its deadline goes with its job.
    scheduler.on_audio(second.slot, second.job_id, b"", final=True, cancelled=True)
    assert scheduler.overdue_aborts(now=11.9) == []
    [overdue] = scheduler.overdue_aborts(now=12.0)
    assert (overdue.slot, overdue.job_id) == (first.slot, first.job_id)
    assert scheduler.overdue_aborts(now=99.0) == [] and scheduler.next_abort_deadline() is None
    # The caller restarts that engine; its slot comes back idle.
    scheduler.slot_lost(first.slot)
    scheduler.slot_ready(first.slot)
    assert scheduler.stats().slots_busy == 0


def test_cancel_of_a_running_chunk_frees_the_slot_only_when_the_engine_confirms() -> None:
    scheduler = make_scheduler(slots=1)
    submit(scheduler, "long", ["a very long chunk."])
    submit(scheduler, "next", ["b."])
    [job] = scheduler.schedule()
    out = scheduler.cancel(["long"])
    assert [(a.slot, a.job_id) for a in out.aborts] == [(0, job.job_id)]
    assert scheduler.schedule() == []  # the engine is still busy with the aborted job
    # Audio the engine sent before it saw the cancel goes nowhere.
    late = scheduler.on_audio(0, job.job_id, b"\x01\x00", final=False)
    assert late.releases == []
    scheduler.on_audio(0, job.job_id, b"", final=True, cancelled=True)
    assert scheduler.stats().cancelled_running == 1
    [nxt] = scheduler.schedule()
    assert nxt.request_id == "next"
    assert [r.final for r in finish(scheduler, nxt)] == [True]
    stats = scheduler.stats()
    assert (stats.requests, stats.running_chunks, stats.slots_busy) == (0, 0, 0)


def test_a_cancel_that_overtakes_its_request_wins() -> None:
    scheduler = make_scheduler()
    scheduler.cancel(["early"])
    assert submit(scheduler, "early", ["x."]) is Admission.CANCELLED
    assert scheduler.schedule() == []


def test_remembered_cancels_are_bounded() -> None:
    scheduler = make_scheduler(remembered_cancels=2)
    scheduler.cancel(["a", "b", "c"])
    assert submit(scheduler, "a", ["x."]) is Admission.ADMITTED
    assert submit(scheduler, "c", ["x."]) is Admission.CANCELLED


def test_a_lost_engine_requeues_its_chunk_without_repeating_released_audio() -> None:
    scheduler = make_scheduler(slots=1)
    submit(scheduler, "r", ["only."])
    [job] = scheduler.schedule()
    first = scheduler.on_audio(0, job.job_id, b"\x01\x00\x02\x00", final=False)
    assert scheduler.slot_lost(0).failures == []
    assert scheduler.schedule() == []  # no engine until it is back
    scheduler.slot_ready(0)
    [retry] = scheduler.schedule()
    assert retry.chunk_index == 0 and retry.job_id != job.job_id
    # The deterministic retry produces the same audio again, then more.
    again = scheduler.on_audio(0, retry.job_id, b"\x01\x00", final=False)
    assert again.releases == []
    rest = scheduler.on_audio(0, retry.job_id, b"\x02\x00\x03\x00", final=True)
    pcm = b"".join(r.pcm for r in first.releases + rest.releases)
    assert pcm == b"\x01\x00\x02\x00\x03\x00"
    assert rest.releases[-1].final and rest.releases[-1].sample_offset == 2


def test_a_chunk_that_keeps_killing_engines_fails_its_request() -> None:
    scheduler = make_scheduler(slots=1, max_attempts=2)
    submit(scheduler, "poison", ["boom."])
    for _ in range(2):
        scheduler.schedule()
        out = scheduler.slot_lost(0)
        scheduler.slot_ready(0)
    assert [(f.request_id, f.status) for f in out.failures] == [("poison", 500)]
    assert scheduler.stats().requests == 0


def test_an_engine_error_fails_the_request_and_aborts_its_other_chunks() -> None:
    scheduler = make_scheduler(slots=2)
    submit(scheduler, "r", ["a.", "b."])
    first, second = scheduler.schedule()
    out = scheduler.on_audio(first.slot, first.job_id, b"", final=True, error="bad voice")
    assert [f.code for f in out.failures] == ["engine_error"]
    assert [a.job_id for a in out.aborts] == [second.job_id]
    assert scheduler.schedule() == []  # slot 1 waits for the abort to be confirmed
    scheduler.on_audio(second.slot, second.job_id, b"", final=True, cancelled=True)
    assert scheduler.stats().slots_busy == 0


def test_audio_for_a_job_the_slot_does_not_run_is_ignored() -> None:
    scheduler = make_scheduler()
    submit(scheduler, "r", ["a."])
    [job] = scheduler.schedule()
    assert scheduler.on_audio(0, job.job_id + 100, b"\x01\x00", final=True).releases == []
    assert scheduler.job_in(0) == job


# A random trace of engines finishing, pieces arriving, cancels and lost engines.
_actions = st.lists(
    st.tuples(
        st.sampled_from(["piece", "final", "cancel", "lose", "submit"]),
        st.integers(0, 3),
        st.integers(1, 5),
    ),
    max_size=80,
)
TRACE_SLOTS = 3


class _Trace:
    """Plays engines and a client against one scheduler, recording what it releases."""

    def __init__(self, texts: dict[str, list[str]]) -> None:
        self.scheduler = make_scheduler(slots=TRACE_SLOTS, max_requests=3)
        self.texts = texts
        self.released: dict[str, list[AudioRelease]] = defaultdict(list)
        self.sent: dict[int, int] = defaultdict(int)  # job id -> bytes the engine sent
        self.pending = list(texts)
        self.admitted: set[str] = set()
        self.ended: set[str] = set()  # finished, failed or cancelled

    def take(self, out: SchedulerOutput) -> None:
        for release in out.releases:
            assert release.request_id not in self.ended
            self.released[release.request_id].append(release)
        self.ended.update(out.finished)
        self.ended.update(f.request_id for f in out.failures)

    def engine_step(self, slot: int, size: int, final: bool) -> None:
        job = self.scheduler.job_in(slot)
        if job is None:
            return
        full = audio_of(job.text)
        cancelling = self.scheduler.slots[slot].cancelling
        start = self.sent[job.job_id]
        piece = b"" if cancelling else full[start : start + 2 * size]
        self.sent[job.job_id] += len(piece)
        last = final or cancelling or self.sent[job.job_id] >= len(full)
        if last and not cancelling:
            piece += full[self.sent[job.job_id]:]
        self.take(self.scheduler.on_audio(slot, job.job_id, piece, final=last,
                                          cancelled=cancelling))

    def act(self, action: str, index: int, size: int) -> None:
        if action == "submit" and self.pending:
            rid = self.pending.pop(0)
            if submit(self.scheduler, rid, self.texts[rid]) is Admission.ADMITTED:
                self.admitted.add(rid)
        elif action in ("piece", "final"):
            self.engine_step(index % TRACE_SLOTS, size, action == "final")
        elif action == "cancel" and self.admitted:
            rid = sorted(self.admitted)[index % len(self.admitted)]
            self.take(self.scheduler.cancel([rid]))
            self.ended.add(rid)
        elif action == "lose":
            self.take(self.scheduler.slot_lost(index % TRACE_SLOTS))
            self.scheduler.slot_ready(index % TRACE_SLOTS)
        self.schedule()
        jobs = [s.job.job_id for s in self.scheduler.slots if s.job is not None]
        assert len(jobs) == len(set(jobs))

    def schedule(self) -> None:
        for job in self.scheduler.schedule():
            self.sent[job.job_id] = 0

    def drain(self) -> None:
        """Engines run every remaining job to the end."""
        for _ in range(500):
            if all(slot.job is None for slot in self.scheduler.slots):
                break
            for slot in range(TRACE_SLOTS):
                self.engine_step(slot, 1000, True)
            self.schedule()


def _assert_released_in_order(releases: list[AudioRelease], expected: bytes) -> None:
    assert [r.seq for r in releases] == list(range(len(releases)))
    pcm = b"".join(r.pcm for r in releases)
    offsets = [r.sample_offset for r in releases]
    assert offsets == [sum(len(r.pcm) for r in releases[:i]) // 2 for i in range(len(releases))]
    if releases[-1].final:
        assert pcm == expected
        assert sum(r.final for r in releases) == 1
    else:
        assert expected.startswith(pcm)


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4), min_size=1,
                      max_size=5),
    actions=_actions,
)
def test_random_traces_release_each_request_exactly_once_in_order(
    requests: list[list[int]], actions: list[tuple[str, int, int]]
) -> None:
    texts = {
        f"r{i}": [f"r{i}c{k}" + "x" * n for k, n in enumerate(sizes)]
        for i, sizes in enumerate(requests)
    }
    expected = {rid: b"".join(audio_of(t) for t in chunks) for rid, chunks in texts.items()}
    trace = _Trace(texts)
    for action, index, size in actions:
        trace.act(action, index, size)
    trace.drain()
    for rid, releases in trace.released.items():
        _assert_released_in_order(releases, expected[rid])
    stats = trace.scheduler.stats()
    assert (stats.requests, stats.queued_chunks, stats.running_chunks, stats.slots_busy) == (
        0, 0, 0, 0,
    )
