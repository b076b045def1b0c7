"""Response objects, SSE framing and error bodies, byte for byte where OpenAI is
strict about shape."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from services.api.config import ApiConfig
from services.api.errors import ApiError, error_type_for
from services.api.generation_plan import (
    GenerationPlan,
    PlanContext,
    plan_chat,
    plan_completion,
)
from services.api.openai_schema import ChatCompletionRequest, CompletionRequest
from services.api.render import DONE, ResponseCollector, StreamRenderer, usage_of
from services.api.requests import ChoiceUpdate


def completion_plan(**body: Any) -> GenerationPlan:
    request = msgspec.convert({"prompt": "p", **body}, CompletionRequest)
    return plan_completion(request, PlanContext(served_model="m", config=ApiConfig(),
                                                response_id="cmpl-1", created=7))


def chat_plan(**body: Any) -> GenerationPlan:
    request = msgspec.convert(
        {"messages": [{"role": "user", "content": "hi"}], **body}, ChatCompletionRequest)
    return plan_chat(request, PlanContext(served_model="m", config=ApiConfig(),
                                          response_id="chatcmpl-1", created=7))


def data(event: bytes) -> Any:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert b"\n" not in event[:-2]  # one line per event: JSON never spans lines
    return json.loads(event[len(b"data: "):-2])


def test_error_body_is_openai_shaped() -> None:
    error = ApiError(429, "slow down", code="server_busy")
    assert json.loads(error.encode()) == {"error": {
        "message": "slow down", "type": "rate_limit_error", "param": None,
        "code": "server_busy"}}
    assert ApiError(200, "nonsense").status == 500  # never a success status
    assert error_type_for(400) == "invalid_request_error"
    assert error_type_for(503) == "server_error"


def test_completion_response() -> None:
    plan = completion_plan(n=2)
    collector = ResponseCollector(plan)
    collector.add([ChoiceUpdate(1, "b", None), ChoiceUpdate(0, "a", None)])
    collector.add([ChoiceUpdate(0, "a", "stop"), ChoiceUpdate(1, "", "length")])
    body = json.loads(msgspec.json.encode(collector.render(usage_of(3, 4))))
    assert body == {
        "id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
        "choices": [
            {"index": 0, "text": "aa", "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "text": "b", "logprobs": None, "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


def test_chat_response() -> None:
    collector = ResponseCollector(chat_plan())
    collector.add([ChoiceUpdate(0, "Hello", "stop")])
    body = json.loads(msgspec.json.encode(collector.render(usage_of(2, 1))))
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-1"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                "logprobs": None, "finish_reason": "stop"}]


def test_chat_stream_opens_with_the_role_and_ends_with_done() -> None:
    renderer = StreamRenderer(chat_plan(stream=True, n=2))
    opening = [data(e) for e in renderer.opening()]
    assert [c["choices"] for c in opening] == [
        [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
          "finish_reason": None}] for i in (0, 1)]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in opening)
    events = renderer.updates([ChoiceUpdate(1, "x", None), ChoiceUpdate(0, "", None),
                               ChoiceUpdate(0, "", "stop")])
    chunks = [data(e) for e in events]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"content": "x"}, {}]
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert renderer.closing(usage_of(1, 1)) == [DONE]


def test_include_usage_adds_null_usage_and_a_last_usage_chunk() -> None:
    renderer = StreamRenderer(completion_plan(stream=True,
                                              stream_options={"include_usage": True}))
    assert renderer.opening() == []
    [chunk] = [data(e) for e in renderer.updates([ChoiceUpdate(0, "t", None)])]
    assert chunk["usage"] is None and chunk["choices"][0]["text"] == "t"
    usage_event, done = renderer.closing(usage_of(2, 5))
    assert done == DONE == b"data: [DONE]\n\n"
    last = data(usage_event)
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


def test_a_failure_mid_stream_is_an_error_event_then_done() -> None:
    renderer = StreamRenderer(completion_plan(stream=True))
    error_event, done = renderer.failure(ApiError(504, "too slow", code="timeout"))
    assert data(error_event)["error"]["code"] == "timeout" and done == DONE


def test_text_with_newlines_stays_one_sse_line() -> None:
    renderer = StreamRenderer(completion_plan(stream=True))
    [event] = renderer.updates([ChoiceUpdate(0, "a\n\nb\r\n", None)])
    assert data(event)["choices"][0]["text"] == "a\n\nb\r\n"


def test_sse_events_escape_what_splitlines_would_break_on() -> None:
    """Model text may hold U+0085, U+2028 or U+2029: raw in the JSON, a client that
    reads events with str.splitlines semantics (httpx's aiter_lines) would cut the
    event there. Escaped, every event is one line and decodes to the same text."""
    import json

    import msgspec

    from services.api.render import sse_event

    class Payload(msgspec.Struct):
        text: str

    text = "a\u2028b\x85c\u2029d\x1ce\n"
    event = sse_event(Payload(text)).decode()
    assert event.startswith("data: ") and event.endswith("\n\n")
    (line,) = event[len("data: "):].strip("\n").splitlines()
    assert json.loads(line) == {"text": text}
