"""Tool calling through the whole mesh with the unmodified ``openai`` client, the
model's template replaced by a Qwen-style one that renders tools
(``--chat-template``): a tool loop's history (an assistant ``tool_calls`` message
with null content, then a ``tool`` message) is accepted and rendered with the
tools exactly as transformers renders them; ``tool_choice`` "required" and a named
function return ``tool_calls`` whose arguments parse and validate against the
tool's parameters (the random-weight model writes garbage on its own: structured
outputs make it call), streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from shared.embedded_model import ensure_embedded_model
from tests.e2e.mesh import Mesh, start_mesh

TEMPLATE = Path(__file__).parent.parent / "templates" / "qwen_tools.jinja"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "unit": {"type": "string", "enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "noop", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}},
]
HISTORY: list[Any] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_abc", "type": "function",
        "function": {"name": "get_weather",
                     "arguments": '{"city": "Paris", "unit": "c", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "21 C, sunny"},
]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(tmp_path_factory.mktemp("mesh"),
                         extra_args=["--chat-template", str(TEMPLATE)])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> OpenAI:
    return OpenAI(base_url=mesh.base_url + "/v1", api_key="unused", max_retries=0,
                  timeout=300)


@pytest.fixture(scope="module")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id


def test_tool_history_round_trip_renders_as_transformers(client: OpenAI, model: str) -> None:
    from transformers import AutoTokenizer

    reply = client.chat.completions.create(model=model, messages=HISTORY, tools=TOOLS,
                                           max_tokens=4, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    hf = AutoTokenizer.from_pretrained(ensure_embedded_model())
    history = json.loads(json.dumps(HISTORY))
    history[1]["tool_calls"][0]["function"]["arguments"] = json.loads(
        HISTORY[1]["tool_calls"][0]["function"]["arguments"])  # templates take a dict
    ids = hf.apply_chat_template(history, tools=TOOLS, chat_template=TEMPLATE.read_text(),
                                 add_generation_prompt=True, tokenize=True, return_dict=False)
    # The prompt the mesh computed is the one transformers renders, tools included.
    assert reply.usage is not None and reply.usage.prompt_tokens == len(ids)
    without_tools = client.chat.completions.create(model=model, messages=HISTORY,
                                                   max_tokens=1, temperature=0)
    assert without_tools.usage is not None
    assert without_tools.usage.prompt_tokens < reply.usage.prompt_tokens


def _check_calls(calls: list[tuple[str, str]], names: set[str]) -> None:
    assert calls, "no tool call returned"
    for name, arguments in calls:
        assert name in names
        schema = next(t["function"]["parameters"] for t in TOOLS
                      if t["function"]["name"] == name)
        jsonschema.validate(json.loads(arguments), schema)


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_parse_and_validate(client: OpenAI, model: str, tool_choice: Any) -> None:
    names = {"get_weather", "noop"} if tool_choice == "required" else {"get_weather"}
    for seed in range(3):
        # One call: left to itself the random model never closes the array of calls.
        reply = client.chat.completions.create(
            model=model, messages=HISTORY[:1], tools=TOOLS, tool_choice=tool_choice,
            parallel_tool_calls=False, max_tokens=200, seed=seed, temperature=1.0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        calls = choice.message.tool_calls or []
        assert len(calls) == 1
        assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
        _check_calls([(c.function.name, c.function.arguments) for c in calls], names)


def test_streamed_forced_calls_arrive_as_tool_call_deltas(client: OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=HISTORY[:1], tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=200, seed=7, stream=True)
    calls: dict[int, list[str]] = {}
    content = ""
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:
                    assert delta.id and delta.id.startswith("call_") and delta.function
                    assert delta.function.name
                    calls[delta.index] = [delta.function.name, ""]
                else:
                    assert not delta.id
                calls[delta.index][1] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    assert content == "" and finish == "tool_calls"
    _check_calls([(n, a) for n, a in calls.values()], {"get_weather", "noop"})


def test_bad_tool_requests_are_400s_naming_the_field(client: OpenAI, model: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model, messages=HISTORY[:1], tools=TOOLS, max_tokens=1,
            tool_choice={"type": "function", "function": {"name": "missing"}})
    assert raised.value.body["param"] == "tool_choice"  # type: ignore[index]


def test_parallel_required_calls_each_validate(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=HISTORY[:1], tools=TOOLS, tool_choice="required",
        max_tokens=120, seed=0)
    calls = reply.choices[0].message.tool_calls or []
    if reply.choices[0].finish_reason == "length":
        calls = calls[:-1]  # the random model goes on adding calls: the last is cut
    _check_calls([(c.function.name, c.function.arguments) for c in calls],
                 {"get_weather", "noop"})
