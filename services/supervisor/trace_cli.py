"""`meshserve trace ID`: a request's span tree from Jaeger's query API v3.

    meshserve trace chatcmpl-0f3a...        # a request id (the api span's gen_ai.response.id)
    meshserve trace 4bf92f3577b34da6a3ce929d0e0e4736   # a trace id (32 hex digits)
    meshserve trace ID --jaeger http://jaeger:16686 --lookback 2h

A trace id is fetched with ``GET /api/v3/traces/{trace_id}``; a request id is found
with ``GET /api/v3/traces?query.service_name=api&query.attributes={...}`` over the
lookback window, and the answer is filtered here as well, since not every Jaeger
storage honours attribute filters. Answers are OTLP JSON
(``{"result": {"resourceSpans": [...]}}``, ids in hex).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

DEFAULT_JAEGER = "http://localhost:16686"
REQUEST_ID_ATTRIBUTE = "gen_ai.response.id"
TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")
LOOKBACK = re.compile(r"^(\d+)([smhd])$")
HTTP_TIMEOUT_S = 30.0
# Attributes worth a line in the tree; the rest stay in Jaeger's UI.
KEY_ATTRIBUTE_PREFIXES = ("gen_ai.", "meshserve.", "error.", "http.response.status_code")


class TraceError(Exception):
    """Why no tree could be printed (exit code 1)."""


@dataclass
class SpanRecord:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    error: str | None
    children: list[SpanRecord] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


# ------------------------------------------------------------------ OTLP JSON


def _hex_id(value: Any) -> str:
    """Jaeger writes ids in hex; a base64 id (proto3 JSON's bytes) is tolerated."""
    text = str(value or "")
    if re.fullmatch(r"[0-9a-fA-F]*", text):
        return text.lower()
    import base64

    return base64.b64decode(text).hex()


def _value(any_value: dict[str, Any]) -> Any:
    for kind, raw in any_value.items():
        match kind:
            case "stringValue" | "boolValue":
                return raw
            case "intValue":
                return int(raw)
            case "doubleValue":
                return float(raw)
            case "arrayValue":
                return [_value(v) for v in raw.get("values", [])]
            case "kvlistValue":
                return _attributes(raw.get("values", []))
            case "bytesValue":
                return raw
    return None


def _attributes(key_values: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: _value(kv.get("value", {})) for kv in key_values}


def _error(status: dict[str, Any]) -> str | None:
    code = status.get("code", 0)
    if code in (2, "STATUS_CODE_ERROR"):
        return status.get("message") or "error"
    return None


def parse_spans(document: dict[str, Any]) -> list[SpanRecord]:
    """Every span of an api_v3 answer (``result`` may be one chunk or a list)."""
    results = document.get("result", document)
    chunks = results if isinstance(results, list) else [results]
    spans = []
    for chunk in chunks:
        for resource_spans in chunk.get("resourceSpans", []):
            resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
            service = str(resource.get("service.name", "?"))
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    spans.append(SpanRecord(
                        trace_id=_hex_id(span.get("traceId")),
                        span_id=_hex_id(span.get("spanId")),
                        parent_span_id=_hex_id(span.get("parentSpanId")),
                        name=span.get("name", ""),
                        service=service,
                        start_ns=int(span.get("startTimeUnixNano", 0)),
                        end_ns=int(span.get("endTimeUnixNano", 0)),
                        attributes=_attributes(span.get("attributes", [])),
                        links=[(_hex_id(link.get("traceId")), _hex_id(link.get("spanId")))
                               for link in span.get("links", [])],
                        error=_error(span.get("status", {})),
                    ))
    return spans


# ------------------------------------------------------------------ the tree


def build_tree(spans: list[SpanRecord]) -> list[SpanRecord]:
    """Roots (no parent, or a parent missing from the answer), children by start."""
    by_id = {s.span_id: s for s in spans}
    roots = []
    for span in spans:
        span.children = []
    for span in sorted(spans, key=lambda s: s.start_ns):
        parent = by_id.get(span.parent_span_id) if span.parent_span_id else None
        if parent is None or parent is span:
            roots.append(span)
        else:
            parent.children.append(span)
    return roots


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    return json.dumps(value)


def format_tree(spans: list[SpanRecord]) -> str:
    if not spans:
        return "no spans"
    by_id = {s.span_id: s for s in spans}
    roots = build_tree(spans)
    trace_ids = sorted({s.trace_id for s in spans})
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    lines = [f"trace {', '.join(trace_ids)}  {len(spans)} spans, "
             f"{len({s.service for s in spans})} services, {(end - start) / 1e6:.1f} ms"]

    def line(span: SpanRecord, depth: int) -> None:
        offset_ms = (span.start_ns - start) / 1e6
        parts = [f"{'  ' * depth}{span.name}  [{span.service}]  {span.duration_ms:.2f} ms"
                 f"  (+{offset_ms:.2f} ms)"]
        if span.parent_span_id and span.parent_span_id not in by_id:
            parts.append(f"parent {span.parent_span_id} not in the trace")
        if span.error is not None:
            parts.append(f"ERROR: {span.error}")
        keys = sorted(k for k in span.attributes if k.startswith(KEY_ATTRIBUTE_PREFIXES))
        if keys:
            parts.append(" ".join(f"{k}={_format_value(span.attributes[k])}" for k in keys))
        lines.append("  ".join(parts))
        for trace_id, span_id in span.links:
            target = by_id.get(span_id)
            where = (f"{target.name} [{target.service}] {span_id}" if target is not None
                     else f"{trace_id}/{span_id}")
            lines.append(f"{'  ' * depth}  -> link to {where}")
        for child in span.children:
            line(child, depth + 1)

    for root in roots:
        line(root, 0)
    return "\n".join(lines)


# ------------------------------------------------------------------ Jaeger


class Jaeger:
    """The two api_v3 reads this command needs (stdlib HTTP: no extra dependency)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def _get(self, path: str, query: dict[str, str] | None = None) -> dict[str, Any] | None:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise TraceError(f"{url}: HTTP {e.code}: {e.read()[:300]!r}") from e
        except (urllib.error.URLError, OSError) as e:
            raise TraceError(f"cannot reach Jaeger at {self.base_url}: {e}") from e
        try:
            return json.loads(body)
        except ValueError as e:
            raise TraceError(f"{url}: not JSON: {body[:200]!r}") from e

    def trace(self, trace_id: str) -> list[SpanRecord]:
        document = self._get(f"/api/v3/traces/{trace_id.lower()}")
        return parse_spans(document) if document is not None else []

    def find_request(self, request_id: str, lookback: timedelta,
                     now: datetime | None = None) -> list[SpanRecord]:
        """The whole trace of the api span whose request id is ``request_id``."""
        now = now or datetime.now(UTC)
        stamp = "%Y-%m-%dT%H:%M:%S.%fZ"
        document = self._get("/api/v3/traces", {
            "query.service_name": "api",
            "query.attributes": json.dumps({REQUEST_ID_ATTRIBUTE: request_id}),
            "query.start_time_min": (now - lookback).strftime(stamp),
            "query.start_time_max": (now + timedelta(minutes=1)).strftime(stamp),
            "query.search_depth": "20",
        })
        spans = parse_spans(document) if document is not None else []
        traces = {s.trace_id for s in spans
                  if s.attributes.get(REQUEST_ID_ATTRIBUTE) == request_id}
        if not traces:
            return []
        if len(traces) > 1:
            raise TraceError(f"request {request_id} is in several traces: {sorted(traces)}")
        (trace_id,) = traces
        # The search may answer with matching spans only; fetch the whole trace.
        return self.trace(trace_id) or [s for s in spans if s.trace_id == trace_id]


# ------------------------------------------------------------------ command


def _lookback(value: str) -> timedelta:
    match = LOOKBACK.match(value)
    if not match:
        raise argparse.ArgumentTypeError(f"{value!r}: expected N followed by s, m, h or d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


def add_parser(commands: Any) -> None:
    trace = commands.add_parser("trace", help="print a request's span tree from Jaeger")
    trace.add_argument("id", metavar="ID", help="a request id (chatcmpl-..., cmpl-...) "
                       "or a 32-hex-digit trace id")
    trace.add_argument("--jaeger", default=None,
                       help=f"Jaeger's query URL (default: $MESHSERVE_JAEGER_URL or "
                       f"{DEFAULT_JAEGER})")
    trace.add_argument("--lookback", type=_lookback, default=timedelta(hours=1),
                       help="how far back a request id is searched (default 1h; e.g. 30m, 2d)")
    trace.add_argument("--json", action="store_true", help="print Jaeger's spans as JSON")


def cmd_trace(args: argparse.Namespace) -> int:
    jaeger = Jaeger(args.jaeger or os.environ.get("MESHSERVE_JAEGER_URL") or DEFAULT_JAEGER)
    try:
        if TRACE_ID.match(args.id):
            spans = jaeger.trace(args.id)
        else:
            spans = jaeger.find_request(args.id, args.lookback)
    except TraceError as e:
        print(f"meshserve: {e}", file=sys.stderr)
        return 1
    if not spans:
        print(f"meshserve: no trace for {args.id} in Jaeger at {jaeger.base_url}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{k: v for k, v in vars(s).items() if k != "children"}
                          for s in spans]))
    else:
        print(format_tree(spans))
    return 0
