"""`meshserve trace` against a stand-in for Jaeger's query API v3.

Jaeger itself cannot run here (no registry to pull its image from), so the test
serves Jaeger's api_v3 answer format (OTLP JSON, ``{"result": {"resourceSpans":
[...]}}``, ids in hex) from an HTTP server of its own. What it serves is not made
up: it is the spans a real mesh (``meshserve up``) exported over OTLP/gRPC into
``tests/otlp.py``'s receiver for one real chat completion.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import anyio
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans

from services.supervisor.cli import main
from tests.otlp import MESH_SERVICES, ReceivedSpan, traced_chat

pytestmark = pytest.mark.slow



def _hex_ids(span: dict[str, Any]) -> dict[str, Any]:
    """proto3 JSON writes bytes in base64; OTLP JSON (and Jaeger) in hex."""
    import base64

    for key in ("traceId", "spanId", "parentSpanId"):
        if span.get(key):
            span[key] = base64.b64decode(span[key]).hex()
    for link in span.get("links", []):
        for key in ("traceId", "spanId"):
            link[key] = base64.b64decode(link[key]).hex()
    return span


def jaeger_document(spans: list[ReceivedSpan]) -> dict[str, Any]:
    """One api_v3 answer holding ``spans``, grouped by the resource that sent them."""
    groups: dict[str, ResourceSpans] = {}
    for received in spans:
        key = json.dumps(received.resource, sort_keys=True, default=str)
        if key not in groups:
            group = ResourceSpans()
            for name, value in received.resource.items():
                kv = group.resource.attributes.add()
                kv.key = name
                if isinstance(value, str):
                    kv.value.string_value = value
                elif isinstance(value, int):
                    kv.value.int_value = value
                else:
                    kv.value.string_value = str(value)
            group.scope_spans.append(ScopeSpans())
            groups[key] = group
        groups[key].scope_spans[0].spans.append(received.span)
    resource_spans = []
    for group in groups.values():
        as_dict = MessageToDict(group)
        for scope in as_dict.get("scopeSpans", []):
            scope["spans"] = [_hex_ids(s) for s in scope.get("spans", [])]
        resource_spans.append(as_dict)
    return {"result": {"resourceSpans": resource_spans}}


class StandInJaeger:
    """``GET /api/v3/traces/{id}`` and ``GET /api/v3/traces?query...`` over real spans."""

    def __init__(self, spans: list[ReceivedSpan]) -> None:
        self.spans = spans
        self.queries: list[dict[str, list[str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path.startswith("/api/v3/traces/"):
                    trace_id = bytes.fromhex(url.path.rsplit("/", 1)[1])
                    found = [s for s in outer.spans if s.span.trace_id == trace_id]
                elif url.path == "/api/v3/traces":
                    query = parse_qs(url.query)
                    outer.queries.append(query)
                    wanted = json.loads(query["query.attributes"][0])
                    service = query["query.service_name"][0]
                    traces = {s.span.trace_id for s in outer.spans if s.service == service
                              and all(s.attributes.get(k) == v for k, v in wanted.items())}
                    found = [s for s in outer.spans if s.span.trace_id in traces]
                else:
                    found = []
                if not found:
                    body = json.dumps({"error": {"httpCode": 404,
                                                 "message": "trace not found"}}).encode()
                    self.send_response(404)
                else:
                    body = json.dumps(jaeger_document(found)).encode()
                    self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def mesh_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[ReceivedSpan]]:
    """(request id, every span received) for one chat completion of a real mesh."""

    return anyio.run(traced_chat, tmp_path_factory.mktemp("trace-mesh"), 3)


@pytest.fixture
def jaeger(mesh_trace: tuple[str, list[ReceivedSpan]]) -> Iterator[StandInJaeger]:
    stand_in = StandInJaeger(mesh_trace[1])
    thread = threading.Thread(target=stand_in.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        stand_in.server.shutdown()
        stand_in.server.server_close()
        thread.join()


def _root(mesh_trace: tuple[str, list[ReceivedSpan]]) -> ReceivedSpan:
    request_id, spans = mesh_trace
    return next(s for s in spans if s.attributes.get("gen_ai.response.id") == request_id)


def _indent(line: str) -> int:
    return (len(line) - len(line.lstrip(" "))) // 2


def test_trace_by_request_id_prints_the_span_tree(
        mesh_trace: tuple[str, list[ReceivedSpan]], jaeger: StandInJaeger,
        capsys: pytest.CaptureFixture[str]) -> None:
    request_id, _ = mesh_trace
    assert main(["trace", request_id, "--jaeger", jaeger.url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    root = _root(mesh_trace)
    assert lines[0].startswith(f"trace {root.span.trace_id.hex()}")
    # The root: the api's server span with its GenAI attributes, not indented.
    assert lines[1].startswith(f"{root.span.name}  [api]")
    assert f"gen_ai.response.id={request_id}" in lines[1]
    assert "gen_ai.usage.input_tokens=" in lines[1] and " ms" in lines[1]
    # Indented by parent: api > tokenizer.encode > scheduler.request > scheduler.step
    # > worker.step, and the worker step notes its link to the request span.
    depth = {}
    for line in lines[1:]:
        name = line.strip().split("  ")[0]
        depth.setdefault(name, _indent(line))
    assert depth["tokenizer.encode"] == 1
    assert depth["scheduler.request"] == 2
    assert depth["scheduler.step"] == 3
    assert depth["worker.step"] == 4
    assert depth["kvcache.sync"] == 4
    worker = next(i for i, line in enumerate(lines) if line.strip().startswith("worker.step"))
    assert "[worker]" in lines[worker]
    assert lines[worker + 1].strip().startswith("-> link to scheduler.request [scheduler]")
    for service in MESH_SERVICES:
        assert f"[{service}]" in out
    # The search asked Jaeger for the api's span with this request id.
    (query,) = jaeger.queries
    assert query["query.service_name"] == ["api"]
    assert json.loads(query["query.attributes"][0]) == {"gen_ai.response.id": request_id}
    assert "query.start_time_min" in query and "query.start_time_max" in query


def test_trace_by_trace_id_and_env_url(
        mesh_trace: tuple[str, list[ReceivedSpan]], jaeger: StandInJaeger,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = _root(mesh_trace)
    monkeypatch.setenv("MESHSERVE_JAEGER_URL", jaeger.url)
    assert main(["trace", root.span.trace_id.hex()]) == 0
    by_trace = capsys.readouterr().out
    print(by_trace)  # shown with -s: what a user sees
    assert by_trace.splitlines()[1].startswith(f"{root.span.name}  [api]")
    assert not jaeger.queries  # a trace id is fetched directly, not searched


def test_unknown_request_and_unreachable_jaeger_fail_with_the_reason(
        jaeger: StandInJaeger, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "chatcmpl-nosuchrequest", "--jaeger", jaeger.url]) == 1
    assert "no trace for chatcmpl-nosuchrequest" in capsys.readouterr().err
    assert main(["trace", "0" * 32, "--jaeger", jaeger.url]) == 1
    # Port 1: nothing listens there.
    assert main(["trace", "chatcmpl-x", "--jaeger", "http://127.0.0.1:1"]) == 1
    assert "cannot reach Jaeger" in capsys.readouterr().err
