"""An OTLP/gRPC trace receiver for tests: what the mesh exports lands here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def attributes_of(key_values: Any) -> dict[str, Any]:
    def value(any_value: Any) -> Any:
        kind = any_value.WhichOneof("value")
        if kind == "array_value":
            return [value(v) for v in any_value.array_value.values]
        return getattr(any_value, kind)

    return {kv.key: value(kv.value) for kv in key_values}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    resource: dict[str, Any]
    span: Span

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes_of(self.span.attributes)


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span, in arrival order, and wakes waiters."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._arrived = anyio.Event()
        send, receive = anyio.create_memory_object_stream[ReceivedSpan](4096)
        self._send = send
        self.stream = receive  # the same spans, one at a time, for tests that consume

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received = ReceivedSpan(resource.get("service.name", ""), resource, span)
                    self.spans.append(received)
                    self._send.send_nowait(received)
        self._arrived.set()
        self._arrived = anyio.Event()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def get(self, timeout: float = 20.0) -> tuple[dict[str, Any], Span]:
        with anyio.fail_after(timeout):
            received = await self.stream.receive()
        return received.resource, received.span

    async def wait_until(self, done: Callable[[list[ReceivedSpan]], bool],
                         timeout: float = 60.0) -> list[ReceivedSpan]:
        """Wait for exports until ``done(spans)`` holds."""
        with anyio.fail_after(timeout):
            while not done(self.spans):
                await self._arrived.wait()
        return self.spans


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[OtlpCollector, dict[str, str]]]:
    """A running receiver and the OTEL_* environment that exports to it quickly."""
    collector = OtlpCollector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    try:
        yield collector, env
    finally:
        await server.stop(None)
