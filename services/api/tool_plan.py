"""A chat request's tools, checked and turned into what the mesh needs.

OpenAI's (and vLLM's) semantics:

- ``tools``: function tools (``{"type": "function", "function": {"name",
  "description", "parameters", "strict"}}``), passed to the chat template as
  transformers takes them (each as that JSON dict).
- ``tool_choice``: absent means "auto" with tools, "none" without. "none" keeps
  the tools in the prompt (vLLM's default, without
  ``--exclude-tools-when-tool-choice-none``) and does not parse the output.
  "auto": the tokenizer parses the model's own format (its ``tool_call_parser``).
  "required" and a named function are enforced by structured outputs: the output
  must be a JSON array of ``{"name", "parameters"}`` objects (one per call, each
  valid under its tool's ``parameters``; vLLM's schema), or the named function's
  parameters, and is parsed as such.
- ``parallel_tool_calls`` false: at most one call (``maxItems`` 1 for
  "required"; the parser keeps the first otherwise).
- History: assistant messages with ``tool_calls`` (``content`` may be null) and
  ``tool`` messages answering a ``tool_call_id``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.api.errors import bad_request
from services.api.openai_schema import ChatCompletionRequest, ChatMessageIn, ToolIn
from shared.grammar import GrammarError, json_schema_grammar
from shared.protocol.tools import ToolCall, ToolCalling, ToolFunction

# OpenAI's rule for function names.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def plan_tools(
    body: ChatCompletionRequest,
) -> tuple[list[ToolFunction] | None, ToolCalling | None, str]:
    """(tools for the template, how to parse the output, the grammar that forces a
    call: "" for none). 400 naming the field for anything malformed."""
    tools = _tools(body.tools or [])
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"`tool_choice` must be 'none', 'auto', 'required' or "
                              f"a named function, got {choice!r}", "tool_choice")
        if choice == "none":
            return tools or None, None, ""
        if not tools:
            raise bad_request(f"`tool_choice` {choice!r} needs `tools`", "tool_choice")
        if choice == "auto":
            return tools, ToolCalling("auto", parallel=parallel), ""
        return tools, ToolCalling("required", parallel=parallel), _grammar(
            required_schema(tools, parallel))
    if choice.type != "function":
        raise bad_request(f"`tool_choice.type` must be 'function', got {choice.type!r}",
                          "tool_choice")
    named = next((t for t in tools if t.name == choice.function.name), None)
    if named is None:
        raise bad_request(f"`tool_choice` names function {choice.function.name!r}, which is "
                          "not in `tools`", "tool_choice")
    return tools, ToolCalling("function", named.name, parallel=False), _grammar(
        named.parameters or EMPTY_PARAMETERS)


def required_schema(tools: list[ToolFunction], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a "required" answer: an array of calls, each
    ``{"name": <a tool>, "parameters": <valid under its schema>}``. Each tool's
    ``$defs`` move to the top, where its ``#/$defs/...`` references resolve."""
    defs: dict[str, Any] = {}
    calls = []
    for tool in tools:
        parameters = dict(tool.parameters or EMPTY_PARAMETERS)
        defs.update(parameters.pop("$defs", {}))
        calls.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [tool.name]},
                           "parameters": parameters},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def history_calls(message: ChatMessageIn, param: str) -> list[ToolCall]:
    """An assistant message's ``tool_calls``, checked (arguments must be JSON)."""
    if not message.tool_calls:
        return []
    if message.role != "assistant":
        raise bad_request("only assistant messages carry `tool_calls`", f"{param}.tool_calls")
    calls = []
    for j, call in enumerate(message.tool_calls):
        where = f"{param}.tool_calls[{j}]"
        if call.type != "function":
            raise bad_request(f"tool call type must be 'function', got {call.type!r}",
                              f"{where}.type")
        try:
            json.loads(call.function.arguments)
        except ValueError as e:
            raise bad_request(f"`arguments` must be JSON text: {e}",
                              f"{where}.function.arguments") from e
        calls.append(ToolCall(call.id, call.function.name, call.function.arguments))
    return calls


def _tools(tools: list[ToolIn]) -> list[ToolFunction]:
    out: list[ToolFunction] = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise bad_request(f"only function tools are served, got type {tool.type!r}",
                              f"tools[{i}].type")
        function = tool.function
        if not FUNCTION_NAME.fullmatch(function.name):
            raise bad_request("a function name is 1 to 64 letters, digits, '_' or '-', got "
                              f"{function.name!r}", f"tools[{i}].function.name")
        if any(t.name == function.name for t in out):
            raise bad_request(f"function {function.name!r} is declared twice",
                              f"tools[{i}].function.name")
        out.append(ToolFunction(function.name, function.description, function.parameters,
                                function.strict))
    return out


def _grammar(schema: dict[str, Any]) -> str:
    try:
        return json_schema_grammar(schema)
    except GrammarError as e:
        raise bad_request(f"the tools' parameters are not a usable JSON schema: {e}",
                          "tools") from e
