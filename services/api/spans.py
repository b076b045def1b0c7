"""The server span of one HTTP request (text or speech), with OTel GenAI attributes.

The span is the root of the request's trace in the mesh (or a child of the
client's ``traceparent`` header): the GenerateRequest (or SpeechRequest) is sent
under its context, so the tokenizer, scheduler and worker spans (or the tts
replica's) hang below it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from services.api.errors import ApiError
from services.api.generation_plan import GenerationPlan
from services.api.openai_schema import SpeechBody
from services.api.requests import Flight
from services.api.speech_flight import SpeechFlight
from shared.telemetry import tracer

_tracer = tracer("meshserve.api")
_propagator = TraceContextTextMapPropagator()


def context_from_headers(headers: Mapping[str, str]) -> Context:
    """The caller's trace context (W3C ``traceparent``), or an empty one."""
    carrier = {k: v for k in ("traceparent", "tracestate") if (v := headers.get(k))}
    return _propagator.extract(carrier) if carrier else Context()


class ServerSpan:
    """Wraps the span so that handlers record facts, not OTel API calls."""

    def __init__(
        self, name: str, attributes: Mapping[str, AttributeValue], parent: Context, path: str
    ) -> None:
        attributes = {**attributes, "http.request.method": "POST", "url.path": path}
        self.span = _tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                       attributes=attributes)
        self.context = trace.set_span_in_context(self.span, parent)
        self._started = time.monotonic()
        self._ended = False

    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def fail(self, error: ApiError) -> None:
        self.span.set_status(Status(StatusCode.ERROR, error.message))
        self.span.set_attributes({
            "error.type": error.code or str(error.status),
            "http.response.status_code": error.status,
        })

    def client_gone(self) -> None:
        self.span.set_attribute("error.type", "client_disconnected")
        self.span.set_status(Status(StatusCode.ERROR, "client disconnected"))

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.span.end()


class RequestSpan(ServerSpan):
    """The span of a completion or chat request."""

    def __init__(self, plan: GenerationPlan, parent: Context, path: str) -> None:
        super().__init__(f"{plan.operation} {plan.model}", plan.span_attributes(), parent,
                         path)
        self.ttft_s: float | None = None

    def first_token(self) -> None:
        """Time to first token: the first text the client can be given."""
        if self.ttft_s is not None:
            return
        self.ttft_s = time.monotonic() - self._started
        self.span.add_event("gen_ai.first_token", {"meshserve.ttft_s": self.ttft_s})
        self.span.set_attribute("meshserve.ttft_s", self.ttft_s)

    def succeed(self, flight: Flight) -> None:
        self.span.set_attributes({
            "gen_ai.usage.input_tokens": flight.prompt_tokens,
            "gen_ai.usage.output_tokens": flight.completion_tokens,
            "gen_ai.response.finish_reasons": flight.finish_reasons(),
            "http.response.status_code": 200,
        })


class SpeechSpan(ServerSpan):
    """The span of a text-to-speech request."""

    def __init__(self, body: SpeechBody, parent: Context, path: str) -> None:
        super().__init__(f"text_to_speech {body.model}", {
            "gen_ai.operation.name": "text_to_speech",
            "gen_ai.request.model": body.model,
            "meshserve.speech.voice": body.voice_name,
            "meshserve.speech.input_chars": len(body.input),
            "meshserve.speech.response_format": body.response_format,
            "meshserve.speech.stream_format": body.stream_format,
        }, parent, path)

    def audio(self, flight: SpeechFlight) -> None:
        """What the client got: time to first audio and seconds of audio."""
        if flight.first_audio_s is not None:
            self.span.set_attribute("meshserve.speech.time_to_first_audio_s",
                                    flight.first_audio_s)
        if flight.sample_rate:
            self.span.set_attribute("meshserve.speech.audio_seconds", flight.audio_s)

    def succeed(self) -> None:
        self.span.set_attribute("http.response.status_code", 200)
