"""Chat tools at the api: tools, tool_choice and tool history checked and turned into
the mesh request (tools for the template, how the output is parsed, the grammar
that forces a call); calls rendered as OpenAI's message and stream deltas."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import llguidance
import msgspec
import pytest
from opentelemetry.context import Context

from services.api.render import ResponseCollector, StreamRenderer, usage_of
from services.api.requests import ChoiceUpdate, Flight, FlightRegistry
from services.api.tool_plan import required_schema
from shared.protocol.generation import TextDelta
from shared.protocol.tools import ToolCall, ToolCallDelta, ToolCalling, ToolFunction
from tests.unit.test_api_generation_plan import chat, error_of

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
NOOP = {"type": "function", "function": {"name": "noop"}}


def test_tools_default_to_auto_and_reach_the_template() -> None:
    request = chat(tools=[WEATHER, NOOP]).requests[0]
    assert request.tool_calling == ToolCalling("auto")
    assert request.tools == [ToolFunction("get_weather", "weather in a city",
                                          WEATHER["function"]["parameters"]),
                             ToolFunction("noop")]
    assert request.tools[1].template_dict() == NOOP
    assert request.sampling.grammar == ""


def test_tool_choice_none_keeps_the_tools_in_the_prompt_and_parses_nothing() -> None:
    request = chat(tools=[WEATHER], tool_choice="none").requests[0]
    assert request.tools is not None and request.tool_calling is None
    assert chat().requests[0].tools is None


def test_required_and_named_carry_a_grammar() -> None:
    required = chat(tools=[WEATHER, NOOP], tool_choice="required",
                    parallel_tool_calls=False).requests[0]
    assert required.tool_calling == ToolCalling("required", parallel=False)
    assert required.sampling.grammar and required.sampling.grammar_field == "tool_choice"
    named = chat(tools=[WEATHER, NOOP],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.requests[0].tool_calling == ToolCalling("function", "get_weather", False)
    assert named.requests[0].sampling.grammar


def _matches(grammar: str, text: str) -> bool:
    """Whether llguidance accepts ``text`` whole under ``grammar`` (bytes as tokens)."""
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    for byte in text.encode():
        if not matcher.consume_token(byte):
            return False
    return matcher.is_accepting()


class _ByteTokenizer:
    """A 256-token byte tokenizer plus EOS, enough to run a matcher in a test."""

    eos_token_id = 256
    bos_token_id = None
    tokens: ClassVar[list[bytes]] = [bytes([b]) for b in range(256)] + [b"</s>"]
    special_token_ids: ClassVar[list[int]] = [256]

    def __call__(self, s: str | bytes) -> list[int]:
        return list(s.encode() if isinstance(s, str) else s)


def test_required_schema_accepts_calls_and_only_calls() -> None:
    tools = [ToolFunction("get_weather", parameters=WEATHER["function"]["parameters"]),
             ToolFunction("noop")]
    grammar = chat(tools=[WEATHER, NOOP], tool_choice="required").requests[0].sampling.grammar
    good = [{"name": "get_weather", "parameters": {"city": "Paris"}},
            {"name": "noop", "parameters": {}}]
    assert _matches(grammar, json.dumps(good, separators=(",", ":")))
    for bad in ([], [{"name": "other", "parameters": {}}],
                [{"name": "get_weather", "parameters": {}}]):
        assert not _matches(grammar, json.dumps(bad, separators=(",", ":"))), bad
    single = required_schema(tools, parallel=False)
    assert single["maxItems"] == 1


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name"),
    ({"tools": [NOOP, NOOP]}, "tools[1].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [NOOP], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ({"tools": [NOOP], "tool_choice": "maybe"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls"),
])
def test_malformed_tool_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    error = error_of(chat, **body)
    assert error.status == 400 and error.param == param, error.message


def test_tool_history_reaches_the_mesh() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    got = chat(messages=messages, tools=[WEATHER]).requests[0].messages
    assert got is not None
    assert got[1].content is None
    assert got[1].tool_calls == [ToolCall("call_1", "get_weather", '{"city": "Paris"}')]
    assert (got[2].role, got[2].tool_call_id, got[2].content) == ("tool", "call_1", "sunny")


def test_replayed_call_deltas_are_deduplicated() -> None:
    plan = chat(tools=[WEATHER])
    table = FlightRegistry(max_inflight=8)
    flight = Flight(plan, Context())
    table.open(flight)

    def delta(offset: int, calls: list[ToolCallDelta], finish: str | None = None) -> TextDelta:
        return TextDelta("chatcmpl-1", "", offset, 3, 1, finish, tool_calls=calls)

    table.apply(delta(0, [ToolCallDelta(0, "get_weather", '{"ci')]))
    # A failover replays from the start, then goes on.
    table.apply(delta(0, [ToolCallDelta(0, "get_weather", '{"city": "P')]))
    table.apply(delta(0, [ToolCallDelta(0, "", 'aris"}', 11), ToolCallDelta(1, "noop", "{}")],
                      "tool_calls"))
    updates: list[ChoiceUpdate] = flight.take()
    calls = [c for u in updates for c in u.tool_calls]
    assert [c.name for c in calls if c.name] == ["get_weather", "noop"]
    assert "".join(c.arguments for c in calls if c.index == 0) == '{"city": "Paris"}'
    assert updates[-1].finish_reason == "tool_calls"


def test_calls_render_as_openai_message_and_stream_deltas() -> None:
    plan = chat(tools=[WEATHER])
    updates = [
        ChoiceUpdate(0, "\n", None, tool_calls=[ToolCallDelta(0, "get_weather", '{"city"')]),
        ChoiceUpdate(0, "", "tool_calls", tool_calls=[ToolCallDelta(0, "", ': "Paris"}')]),
    ]
    collector = ResponseCollector(plan)
    collector.add(updates)
    body = msgspec.to_builtins(collector.render(usage_of(3, 4)))
    message = body["choices"][0]["message"]
    assert message["content"] is None and body["choices"][0]["finish_reason"] == "tool_calls"
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    events = StreamRenderer(plan).updates(updates)
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events]
    first, second = (c["choices"][0]["delta"] for c in chunks)
    assert first["content"] == "\n"
    assert first["tool_calls"][0]["id"].startswith("call_")
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city"'}
    assert second == {"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]}
    assert chunks[1]["choices"][0]["finish_reason"] == "tool_calls"
