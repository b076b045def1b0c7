"""``POST /tokenize`` and ``POST /detokenize``, as vLLM serves them.

    /tokenize    {"prompt": "..."} or {"messages": [...], "add_generation_prompt": true}
                 (+ "add_special_tokens": true for a prompt, false for messages)
                 -> {"count", "max_model_len", "tokens", "token_strs": null}
    /detokenize  {"tokens": [...]} -> {"prompt": "..."}

The ids are a tokenizer replica's (``TokenizeRequest`` on the api<->tokenizer
socket), the same encoding generation uses; this process loads no tokenizer.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.api.body import read_json
from services.api.config import ApiConfig
from services.api.errors import bad_request
from services.api.generation_plan import _messages as chat_messages  # the chat path's rules
from services.api.generation_plan import check_model
from services.api.openai_schema import ChatMessageIn
from services.api.responses import json_response
from services.api.service import ApiActor
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResult,
    TokenizeRequest,
    TokenizeResult,
)


class TokenizeBody(msgspec.Struct, frozen=True, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_generation_prompt: bool = True
    # vLLM's defaults: true for a completions prompt, false for chat (the template
    # writes the special tokens itself).
    add_special_tokens: bool | None = None
    # vLLM fields not served here: a 400 names them rather than ignoring them.
    return_token_strs: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    tools: list[Any] | None = None


class TokenizeResponse(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: None = None


class DetokenizeBody(msgspec.Struct, frozen=True, kw_only=True):
    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(msgspec.Struct, frozen=True, kw_only=True):
    prompt: str


def tokenize_message(body: TokenizeBody, request_id: str) -> TokenizeRequest:
    """Validate ``body`` (400 naming the field) and build the mesh message."""
    for name in ("return_token_strs", "continue_final_message", "chat_template", "tools"):
        if getattr(body, name):
            raise bad_request(f"`{name}` is not supported by /tokenize", name)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("exactly one of `prompt` or `messages` must be given",
                          "prompt" if body.prompt is None else "messages")
    if body.messages is not None:
        return TokenizeRequest(
            request_id, messages=chat_messages(body.messages),
            add_generation_prompt=body.add_generation_prompt,
            add_special_tokens=bool(body.add_special_tokens),
        )
    return TokenizeRequest(request_id, prompt=body.prompt,
                           add_special_tokens=body.add_special_tokens is not False)


class TokenizeRoutes:
    def __init__(self, actor: ApiActor, config: ApiConfig, served_models: list[str]) -> None:
        self.actor = actor
        self.config = config
        self.served_models = served_models

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
        ]

    def _check_model(self, requested: str | None) -> None:
        if requested not in self.served_models:
            check_model(requested, self.served_models[0])

    async def tokenize(self, request: Request) -> Response:
        body = await read_json(request, TokenizeBody, self.config.max_request_bytes,
                               self.config.body_timeout_s)
        self._check_model(body.model)
        answer = await self.actor.call_tokenizer(
            tokenize_message(body, f"tokenize-{uuid.uuid4().hex}"))
        assert isinstance(answer, TokenizeResult)
        tokens = list(unpack_i32(answer.token_ids))
        return json_response(TokenizeResponse(count=len(tokens), tokens=tokens,
                                              max_model_len=self.actor.max_model_len()))

    async def detokenize(self, request: Request) -> Response:
        body = await read_json(request, DetokenizeBody, self.config.max_request_bytes,
                               self.config.body_timeout_s)
        self._check_model(body.model)
        if any(not -(1 << 31) <= t < (1 << 31) for t in body.tokens):
            raise bad_request("`tokens` must be token ids (32-bit integers)", "tokens")
        answer = await self.actor.call_tokenizer(
            DetokenizeRequest(f"detokenize-{uuid.uuid4().hex}", pack_i32(body.tokens)))
        assert isinstance(answer, DetokenizeResult)
        return json_response(DetokenizeResponse(prompt=answer.text))
