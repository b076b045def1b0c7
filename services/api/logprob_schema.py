"""Logprobs in OpenAI's response shapes (and vLLM's ``prompt_logprobs``).

- completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``,
  one entry per token; ``top_logprobs`` maps token text to logprob (the top
  ``logprobs`` tokens, plus the chosen one when it is not among them). With ``echo``
  the prompt's tokens come first, the very first one with null logprobs.
- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
- ``prompt_logprobs`` (vLLM): per prompt position null (the first) or
  ``{token_id: {"logprob", "rank", "decoded_token"}}``.

``-inf`` becomes -9999.0, as OpenAI and vLLM send it (JSON has no infinity).
"""

from __future__ import annotations

import msgspec


class CompletionLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    content: list[ChatTokenLogprob]


class PromptLogprob(msgspec.Struct, frozen=True, kw_only=True):
    logprob: float
    rank: int
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]
