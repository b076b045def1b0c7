"""An OTLP/gRPC trace receiver for tests: what the mesh exports lands here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx
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


MESH_SERVICES = frozenset({"api", "tokenizer", "scheduler", "kvcache", "worker"})
# Spans that end last in a request's trace: once these are in, the trace is whole.
TRACE_SPANS = frozenset({"tokenizer.finish", "scheduler.request", "kvcache.sync", "worker.step"})


def trace_is_whole(spans: list[ReceivedSpan], request_id: str) -> bool:
    """Whether the trace of the api request ``request_id`` (its response id) holds
    every mesh service's spans, up to the last ones a request makes."""
    root = next((s for s in spans if s.attributes.get("gen_ai.response.id") == request_id),
                None)
    if root is None:
        return False
    mine = [s for s in spans if s.span.trace_id == root.span.trace_id]
    return ({s.service for s in mine} >= MESH_SERVICES
            and {s.span.name for s in mine} >= TRACE_SPANS)


async def traced_chat(tmp_path: Path, max_tokens: int) -> tuple[str, list[ReceivedSpan]]:
    """One chat completion through a real mesh exporting to a receiver run here:
    (the response id, every span received once that request's trace is whole)."""
    from tests.e2e.mesh import start_mesh

    async with otlp_receiver() as (collector, env):
        mesh = start_mesh(tmp_path, env=env)
        try:
            async with httpx.AsyncClient(base_url=mesh.base_url, timeout=60) as client:
                model = (await client.get("/v1/models")).json()["data"][0]["id"]
                response = await client.post("/v1/chat/completions", json={
                    "model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": "trace me"}]})
                assert response.status_code == 200, response.text
            request_id: str = response.json()["id"]

            spans = await collector.wait_until(
                lambda spans: trace_is_whole(spans, request_id), timeout=90)
        finally:
            mesh.stop()
    return request_id, list(spans)
