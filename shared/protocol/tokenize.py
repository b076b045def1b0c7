"""api <-> tokenizer: ``/tokenize`` and ``/detokenize`` (vLLM's endpoints).

One request, one answer, on the same sockets as generation: the api sends a
``TokenizeRequest`` or ``DetokenizeRequest`` to a tokenizer replica, which answers
with a ``TokenizeResult`` / ``DetokenizeResult`` under the same ``request_id``, or a
``RequestFailed`` (HTTP 400 for a prompt it cannot encode or an id out of range).
Nothing reaches the scheduler: the api process never loads a tokenizer.

Schema evolution: new fields get defaults and go last; never reorder.
"""

from __future__ import annotations

import msgspec

from shared.protocol.generation import ChatMessage


class TokenizeRequest(msgspec.Struct, frozen=True, tag=True):
    """api -> tokenizer: the ids of a completions ``prompt`` or of chat ``messages``
    (exactly one is set) as generation would encode them, unless
    ``add_special_tokens`` says otherwise."""

    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class TokenizeResult(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    token_ids: bytes  # packed int32


class DetokenizeRequest(msgspec.Struct, frozen=True, tag=True):
    """api -> tokenizer: the text of these ids, special tokens included."""

    request_id: str
    token_ids: bytes  # packed int32


class DetokenizeResult(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    text: str
