"""Tool calling on the wire: the tools a chat request offers, the calls an assistant
message made (history), how a request's output is to be parsed, and the calls a
tokenizer found in the output.

The api validates what the client sent (``tools``, ``tool_choice``, messages); the
tokenizer renders tools and calls through the chat template and parses the output
(services/tokenizer/tool_parsers.py); the api renders the calls as OpenAI's
``tool_calls`` and gives them their ids.

Schema evolution: as in generation.py, new fields get defaults and go last.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ToolFunction(msgspec.Struct, frozen=True):
    """One function tool as the client declared it; ``parameters`` is its JSON
    schema, passed to the chat template unchanged. None: the client left it out."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def template_dict(self) -> dict[str, Any]:
        """The tool as transformers' ``apply_chat_template(tools=...)`` takes it:
        ``{"type": "function", "function": {...}}``, fields left out stay out."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        if self.strict is not None:
            function["strict"] = self.strict
        return {"type": "function", "function": function}


class ToolCall(msgspec.Struct, frozen=True):
    """A call in an assistant message of the history. ``arguments`` is the JSON
    text the client sent (the api checked that it parses)."""

    id: str
    name: str
    arguments: str


class ToolCalling(msgspec.Struct, frozen=True):
    """How a request's output is parsed for calls (None on the request: not at all,
    ``tool_choice`` "none" or no tools).

    ``mode``: "auto" (the model's own format, the tokenizer's parser), "required"
    (the output is a JSON array of ``{"name", "parameters"}`` objects) or
    "function" (the output is the arguments of ``function``). ``parallel`` False
    keeps only the first call."""

    mode: str
    function: str = ""
    parallel: bool = True


class ToolCallDelta(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """New text of call ``index`` of one request's output: its ``name`` in the first
    delta of the call (empty after), then fragments of its ``arguments`` JSON text.
    ``arguments_offset`` counts the argument characters released before this one,
    so the api drops what a replay after a tokenizer failover repeats."""

    index: int
    name: str = ""
    arguments: str = ""
    arguments_offset: int = 0
