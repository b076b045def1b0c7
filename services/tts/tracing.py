"""The spans of a tts replica: ``tts.request`` per admitted request (queue to last
audio, with a ``first_audio`` event) and ``tts.synthesize`` per chunk job below it.

The request span's context travels back with every message about the request, so
the api's server span, the replica's spans and the audio form one trace. The actor
reports facts here; this module makes the OTel calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode

from services.tts.scheduler import AudioRelease, SpeechJob
from shared.protocol.speech import SpeechRequest
from shared.telemetry import tracer

_tracer = tracer("meshserve.tts")


@dataclass(slots=True)
class RequestTrace:
    span: Span
    context: Context  # the span's context, sent with every message about the request
    sample_rate: int  # of the audio sent back (the engine's native rate when asked 0)
    submitted: float
    samples: int = 0


class SpeechTraces:
    """The open spans of a replica's requests and jobs."""

    def __init__(self) -> None:
        self._requests: dict[str, RequestTrace] = {}
        self._jobs: dict[int, Span] = {}

    def request_ids(self) -> list[str]:
        """Every admitted request not yet finished, failed or cancelled."""
        return list(self._requests)

    def get(self, request_id: str) -> RequestTrace | None:
        return self._requests.get(request_id)

    def admitted(
        self, request: SpeechRequest, received: Context, *, model: str, sample_rate: int,
        chunks: int,
    ) -> None:
        span = _tracer.start_span(
            "tts.request",
            context=received,
            attributes={
                "gen_ai.operation.name": "text_to_speech",
                "gen_ai.request.model": model,
                "meshserve.speech.voice": request.voice,
                "meshserve.speech.input_chars": len(request.input),
                "meshserve.speech.chunks": chunks,
            },
        )
        self._requests[request.request_id] = RequestTrace(
            span, trace.set_span_in_context(span, received), sample_rate, time.monotonic()
        )

    def released(self, release: AudioRelease) -> RequestTrace | None:
        """Audio of a request goes out; None for a request no longer traced."""
        traced = self._requests.get(release.request_id)
        if traced is None:
            return None
        if release.seq == 0:
            traced.span.add_event(
                "first_audio", {"time_to_first_audio_s": time.monotonic() - traced.submitted}
            )
        traced.samples += len(release.pcm) // 2
        return traced

    def finished(self, request_id: str) -> None:
        traced = self._requests.pop(request_id, None)
        if traced is not None:
            traced.span.set_attribute(
                "meshserve.speech.audio_seconds", traced.samples / traced.sample_rate
            )
            traced.span.end()

    def failed(self, request_id: str, message: str) -> Context | None:
        """Ends the request's span; its context, for the failure message."""
        traced = self._requests.pop(request_id, None)
        if traced is None:
            return None
        traced.span.set_status(Status(StatusCode.ERROR, message))
        traced.span.end()
        return traced.context

    def cancelled(self, request_id: str, reason: str) -> None:
        traced = self._requests.pop(request_id, None)
        if traced is not None:
            traced.span.add_event("cancelled", {"reason": reason})
            traced.span.end()

    def job_started(self, job: SpeechJob) -> None:
        traced = self._requests.get(job.request_id)
        self._jobs[job.job_id] = _tracer.start_span(
            "tts.synthesize",
            context=traced.context if traced else None,
            attributes={
                "meshserve.speech.chunk": job.chunk_index,
                "meshserve.speech.chunk_chars": len(job.text),
                "meshserve.speech.engine_slot": job.slot,
            },
        )

    def job_ended(self, job_id: int, *, cancelled: bool, error: str | None) -> None:
        span = self._jobs.pop(job_id, None)
        if span is None:
            return
        span.set_attribute("meshserve.speech.cancelled", cancelled)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()
