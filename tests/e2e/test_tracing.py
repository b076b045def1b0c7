"""One chat completion through the real mesh yields one trace: api -> tokenizer ->
scheduler -> (kvcache, worker step), exported over OTLP/gRPC to a receiver the test
runs, with the batch span's links and the GenAI attributes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.otlp import ReceivedSpan, traced_chat

pytestmark = pytest.mark.anyio


def trace_of(spans: list[ReceivedSpan], trace_id: bytes) -> list[ReceivedSpan]:
    return [s for s in spans if s.span.trace_id == trace_id]


async def test_one_request_is_one_trace_across_the_mesh(tmp_path: Path) -> None:
    request_id, spans = await traced_chat(tmp_path, max_tokens=4)
    api = next(s for s in spans if s.attributes.get("gen_ai.response.id") == request_id)
    assert api.service == "api" and api.span.name.startswith("chat ")
    mine = trace_of(spans, api.span.trace_id)
    by_id = {s.span.span_id: s for s in mine}

    def parent(s: ReceivedSpan) -> ReceivedSpan:
        return by_id[s.span.parent_span_id]

    def one(name: str) -> ReceivedSpan:
        found = [s for s in mine if s.span.name == name]
        assert found, f"no {name} span in the trace"
        return found[0]

    assert not api.span.parent_span_id  # the root
    encode = one("tokenizer.encode")
    assert encode.service == "tokenizer" and parent(encode) is api
    request = one("scheduler.request")
    assert request.service == "scheduler" and parent(request) is encode
    assert request.attributes["gen_ai.usage.input_tokens"] > 0
    assert "meshserve.queue_time_s" in request.attributes
    steps = [s for s in mine if s.span.name == "scheduler.step"]
    assert steps and all(parent(s) is request for s in steps)
    worker_steps = [s for s in mine if s.span.name == "worker.step"]
    assert worker_steps and all(parent(s).span.name == "scheduler.step" for s in worker_steps)
    assert {w.service for w in worker_steps} == {"worker"}
    # The batch span links to every request it served: here, this one.
    for step in worker_steps:
        assert [link.span_id for link in step.span.links] == [request.span.span_id]
    sync = one("kvcache.sync")
    assert sync.service == "kvcache" and parent(sync).span.name == "scheduler.step"
    finish = one("tokenizer.finish")
    assert finish.service == "tokenizer"

    attributes = api.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"]
    assert attributes["gen_ai.usage.input_tokens"] == request.attributes[
        "gen_ai.usage.input_tokens"]
    assert 0 < attributes["gen_ai.usage.output_tokens"] <= 4
    assert attributes["meshserve.ttft_s"] > 0
    assert {s.resource["service.instance.id"] for s in mine} >= {
        "api/0", "tokenizer/0", "scheduler/0", "kvcache/0", "worker/0"}
