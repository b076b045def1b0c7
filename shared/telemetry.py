"""OpenTelemetry set-up and W3C trace-context propagation through envelopes.

Export is configured only by the standard OTEL_* variables and is off when no
OTLP endpoint is set; the API then hands out non-recording spans that cost almost
nothing, so instrumented code never checks whether tracing is on.
"""

from __future__ import annotations

import os

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.protocol.envelope import Envelope

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def export_endpoint_configured() -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ) and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"


def configure_telemetry(service: str, replica: int) -> None:
    """Install a tracer provider exporting OTLP when an endpoint is configured."""
    global _provider
    if not export_endpoint_configured() or _provider is not None:
        return
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    resource = Resource.create(
        {"service.name": service, "service.instance.id": f"{service}/{replica}"}
    )
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)


def shutdown_telemetry() -> None:
    """Flush and stop the exporter; spans of the last requests must not be lost."""
    if _provider is not None:
        _provider.force_flush()
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_context(ctx: Context | None = None) -> tuple[str, str]:
    """The (traceparent, tracestate) of ``ctx`` (default: the current context)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=ctx)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def context_of(envelope: Envelope) -> Context:
    """The trace context a message was sent under (empty context when none)."""
    if not envelope.traceparent:
        return otel_context.Context()
    carrier = {"traceparent": envelope.traceparent}
    if envelope.tracestate:
        carrier["tracestate"] = envelope.tracestate
    return _propagator.extract(carrier)


def span_context_of(traceparent: str) -> trace.SpanContext:
    """The span context a W3C traceparent names (invalid when it names none)."""
    return trace.get_current_span(_propagator.extract({"traceparent": traceparent})
                                  ).get_span_context()
