"""Tool calls as OpenAI renders them: ids, stream deltas, and the message's list.

The tokenizer sends a call's name and then fragments of its arguments under an
index (shared/protocol/tools.py); here each call of each choice gets its id
(``call_`` and 24 random hex digits, made once, on the call's first delta) and
becomes ``delta.tool_calls`` entries (streamed) or ``message.tool_calls``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.api.openai_schema import (
    FunctionCall,
    FunctionCallDelta,
    ToolCallDeltaOut,
    ToolCallOut,
)
from shared.protocol.tools import ToolCallDelta


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class StreamedCalls:
    """Renders the call deltas of a streamed response's choices."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, int], str] = {}

    def deltas(self, choice: int, calls: Sequence[ToolCallDelta]) -> list[ToolCallDeltaOut]:
        out = []
        for call in calls:
            key = (choice, call.index)
            if key not in self._ids:
                self._ids[key] = new_call_id()
                out.append(ToolCallDeltaOut(
                    index=call.index, id=self._ids[key], type="function",
                    function=FunctionCallDelta(name=call.name, arguments=call.arguments)))
            else:
                out.append(ToolCallDeltaOut(
                    index=call.index, function=FunctionCallDelta(arguments=call.arguments)))
        return out


@dataclass(slots=True)
class CollectedCalls:
    """The calls of one buffered choice, assembled from their deltas."""

    names: list[str] = field(default_factory=list)
    arguments: list[list[str]] = field(default_factory=list)

    def add(self, calls: Sequence[ToolCallDelta]) -> None:
        for call in calls:
            if call.index == len(self.names):
                self.names.append(call.name)
                self.arguments.append([])
            self.arguments[call.index].append(call.arguments)

    def render(self) -> list[ToolCallOut]:
        return [ToolCallOut(id=new_call_id(),
                            function=FunctionCall(name=name, arguments="".join(parts)))
                for name, parts in zip(self.names, self.arguments, strict=True)]
