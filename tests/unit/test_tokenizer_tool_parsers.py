"""Tool-call parsers (services/tokenizer/tool_parsers.py): each format whole, and
the same text split at every character boundary (and one character at a time)
gives the same content and calls, with argument fragments in order."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from services.tokenizer.tool_parsers import detect_parser, make_parser

Calls = list[tuple[str, str]]


def parse(name: str, pieces: Sequence[str], **options: Any) -> tuple[str, Calls, bool]:
    """(content, [(name, arguments)], called) after feeding ``pieces``; checks the
    deltas' invariants on the way (name first, offsets contiguous, indexes dense)."""
    parser = make_parser(name, **options)
    content = ""
    calls: list[list[str]] = []
    for out in [*(parser.push(p) for p in pieces), parser.finish()]:
        content += out.content
        for delta in out.calls:
            if delta.index == len(calls):
                assert delta.name, "a call's first delta names it"
                calls.append([delta.name, ""])
            else:
                assert delta.index == len(calls) - 1, "deltas of earlier calls never return"
                assert not delta.name
            assert delta.arguments_offset == len(calls[delta.index][1])
            calls[delta.index][1] += delta.arguments
    return content, [(n, a) for n, a in calls], parser.called


CASES: list[tuple[str, str, str, Calls]] = [
    ("hermes",
     'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris", "unit": "c"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
     "Let me check.\n",
     [("get_weather", '{"city": "Paris", "unit": "c"}'),
      ("get_time", '{"tz": "Europe/Paris"}')]),
    ("hermes", 'Plain answer with <b>tags</b> and a <tool_ mention.',
     'Plain answer with <b>tags</b> and a <tool_ mention.', []),
    ("hermes", '<tool_call>{"arguments": {"q": "a\\"}b"}, "name": "sea\\u0072ch"}</tool_call>',
     "", [("search", '{"q": "a\\"}b"}')]),
    ("hermes", '<tool_call>{"name": "f"}</tool_call> done', " done", [("f", "{}")]),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": [1, 2',
     "", [("f", '{"a": [1, 2')]),
    ("llama3_json",
     '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "noop", "parameters": {}}',
     "", [("get_weather", '{"city": "Paris"}'), ("noop", "{}")]),
    ("llama3_json", '{"name": "n", "parameters": 12}', "", [("n", "12")]),
    ("llama3_json", "The answer is {42}.", "The answer is {42}.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", "<|python_", "<|python_", []),
    ("mistral",
     'Calling. [TOOL_CALLS][{"name": "a", "arguments": {"x": [1, {"y": "]"}]}}, '
     '{"name": "b", "arguments": {}}]',
     "Calling. ", [("a", '{"x": [1, {"y": "]"}]}'), ("b", "{}")]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]b{"k": true}',
     "", [("get_weather", '{"city": "Paris"}'), ("b", '{"k": true}')]),
    ("mistral", "No tools [TOOL here.", "No tools [TOOL here.", []),
    ("required",
     '[{"name": "a", "parameters": {"s": "x,y"}}, {"name": "b", "parameters": {"n": -1.5e3}}]',
     "", [("a", '{"s": "x,y"}'), ("b", '{"n": -1.5e3}')]),
]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_whole_and_split_at_every_boundary(parser: str, text: str, content: str,
                                           calls: Calls) -> None:
    expected = (content, calls, bool(calls))
    assert parse(parser, [text]) == expected
    assert parse(parser, list(text)) == expected
    for cut in range(len(text) + 1):
        assert parse(parser, [text[:cut], text[cut:]]) == expected, cut


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral", "required"])
def test_arguments_parse_as_the_json_written(parser: str) -> None:
    args = {"city": "Zürich", "days": [1, 2], "nested": {"q": "a \"quoted\" }"}}
    body = json.dumps({"name": "weather", "arguments" if parser != "llama3_json"
                       else "parameters": args}, ensure_ascii=False)
    if parser == "required":
        body = body.replace('"arguments"', '"parameters"')
    text = {"hermes": f"<tool_call>\n{body}\n</tool_call>", "llama3_json": body,
            "mistral": f"[TOOL_CALLS][{body}]", "required": f"[{body}]"}[parser]
    _, calls, _ = parse(parser, list(text))
    assert [(name, json.loads(arguments)) for name, arguments in calls] == [("weather", args)]


def test_parallel_false_keeps_the_first_call() -> None:
    text = '[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {}}]'
    assert parse("required", list(text), parallel=False) == ("", [("a", "{}")], True)


def test_function_parser_takes_the_whole_output_as_arguments() -> None:
    for pieces in (['{"x": 1}'], list(' {"x": 1}')):
        assert parse("function", pieces, function="fn") == ("", [("fn", '{"x": 1}')], True)
    # Nothing generated (max_tokens hit at once): still the one call.
    assert parse("function", [], function="fn") == ("", [("fn", "{}")], True)


def test_whitespace_after_calls_is_not_content() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\n'
    assert parse("hermes", list(text)) == ("", [("f", "{}")], True)


def test_unknown_parser_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown tool call parser 'pythonic'"):
        make_parser("pythonic")


@pytest.mark.parametrize(("template", "parser"), [
    ("{% for tool in tools %}<tool_call>{% endfor %}", "hermes"),
    ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]", "mistral"),
    ("<|python_tag|>{{ x }}", "llama3_json"),
    ("{{ messages }}", ""),
    (None, ""),
])
def test_parser_detected_from_the_template(template: str | None, parser: str) -> None:
    assert detect_parser(template) == parser
