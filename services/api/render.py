"""Response objects and server-sent events, built from what a flight produced.

SSE framing is OpenAI's: every event is ``data: {json}\\n\\n``, a stream ends with
``data: [DONE]\\n\\n``, and an error after the headers went out is an event
``data: {"error": {...}}`` (the ``openai`` client raises it as ``APIError``)
followed by ``[DONE]``. Chat streams open with a ``{"role": "assistant"}`` delta per
choice. With ``stream_options.include_usage`` every chunk carries ``"usage": null``
and one last chunk with no choices carries the usage.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from msgspec import UNSET

from services.api.errors import ApiError
from services.api.generation_plan import GenerationPlan
from services.api.logprob_render import (
    TokenRow,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs,
    token_rows,
)
from services.api.logprob_schema import CompletionLogprobs
from services.api.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    Usage,
)
from services.api.requests import ChoiceUpdate
from services.api.tool_render import CollectedCalls, StreamedCalls

DONE = b"data: [DONE]\n\n"

_encoder = msgspec.json.Encoder()


# Characters Python's str.splitlines (and so httpx's ``aiter_lines``) treats as line
# ends although SSE does not: written raw inside a JSON string they cut an event in
# two for such clients. JSON allows them escaped; only strings can hold them.
_LINE_BREAKING = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"),
                  (b"\xe2\x80\xa9", b"\\u2029"))


def sse_event(payload: msgspec.Struct) -> bytes:
    data = _encoder.encode(payload)
    for raw, escaped in _LINE_BREAKING:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


def sse_error(error: ApiError) -> bytes:
    return sse_event(error.body())


def usage_of(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class StreamRenderer:
    """The SSE events of one streamed response, in order."""

    def __init__(self, plan: GenerationPlan) -> None:
        self.plan = plan
        # Present-but-null on every chunk when usage was asked for, absent otherwise.
        self._chunk_usage = None if plan.include_usage else UNSET
        self._text_offsets = [0] * len(plan.requests)  # completions' logprob text_offset
        self._calls = StreamedCalls()

    def opening(self) -> list[bytes]:
        """Chat opens with the assistant role for every choice; completions with nothing."""
        if self.plan.operation != "chat":
            return []
        return [
            self._chat_chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant",
                                                                           content=""))])
            for i in range(len(self.plan.requests))
        ]

    def updates(self, updates: Sequence[ChoiceUpdate]) -> list[bytes]:
        events = []
        for update in updates:
            if not update.text and update.finish_reason is None and not update.tool_calls:
                continue
            rows = token_rows(update.logprobs)
            if self.plan.operation == "chat":
                delta = ChatDelta(
                    content=update.text if update.text else UNSET,
                    tool_calls=(self._calls.deltas(update.index, update.tool_calls)
                                if update.tool_calls else UNSET))
                events.append(self._chat_chunk([ChatChunkChoice(
                    index=update.index, delta=delta, finish_reason=update.finish_reason,
                    logprobs=chat_logprobs(rows) if self.plan.logprobs else None,
                )]))
            else:
                prompt_rows = token_rows(update.prompt_logprobs)
                echo = self.plan.echo_prefix(update.echo)
                offset = self._text_offsets[update.index]
                logprobs = _completion_logprobs(self.plan, rows, prompt_rows, update.echo,
                                                offset)
                if logprobs is not None:
                    self._text_offsets[update.index] = offset + sum(map(len, logprobs.tokens))
                events.append(sse_event(Completion(
                    id=self.plan.response_id,
                    created=self.plan.created,
                    model=self.plan.model,
                    choices=[CompletionChoice(
                        index=update.index, text=echo + update.text,
                        finish_reason=update.finish_reason, logprobs=logprobs,
                        prompt_logprobs=(prompt_logprobs(prompt_rows)
                                         if self.plan.show_prompt_logprobs and prompt_rows
                                         else UNSET),
                    )],
                    usage=self._chunk_usage,
                )))
        return events

    def closing(self, usage: Usage) -> list[bytes]:
        """The usage chunk (when asked for) and ``[DONE]``."""
        if not self.plan.include_usage:
            return [DONE]
        if self.plan.operation == "chat":
            last = self._chat_chunk([], usage)
        else:
            last = sse_event(Completion(
                id=self.plan.response_id, created=self.plan.created, model=self.plan.model,
                choices=[], usage=usage,
            ))
        return [last, DONE]

    def failure(self, error: ApiError) -> list[bytes]:
        return [sse_error(error), DONE]

    def _chat_chunk(
        self, choices: list[ChatChunkChoice], usage: Usage | None = None
    ) -> bytes:
        return sse_event(ChatCompletionChunk(
            id=self.plan.response_id,
            created=self.plan.created,
            model=self.plan.model,
            choices=choices,
            usage=usage if usage is not None else self._chunk_usage,
        ))


class ResponseCollector:
    """Gathers a non-streamed response's text per choice, then renders it."""

    def __init__(self, plan: GenerationPlan) -> None:
        self.plan = plan
        self._texts: list[list[str]] = [[] for _ in plan.requests]
        self._finish: list[str | None] = [None for _ in plan.requests]
        self._rows: list[list[TokenRow]] = [[] for _ in plan.requests]
        self._prompt_rows: list[list[TokenRow]] = [[] for _ in plan.requests]
        self._echo: list[tuple[str, str] | None] = [None for _ in plan.requests]
        self._calls = [CollectedCalls() for _ in plan.requests]

    def add(self, updates: Sequence[ChoiceUpdate]) -> None:
        for update in updates:
            i = update.index
            self._texts[i].append(update.text)
            self._rows[i] += token_rows(update.logprobs)
            self._prompt_rows[i] += token_rows(update.prompt_logprobs)
            self._echo[i] = self._echo[i] or update.echo
            self._calls[i].add(update.tool_calls)
            if update.finish_reason is not None:
                self._finish[i] = update.finish_reason

    def render(self, usage: Usage) -> Completion | ChatCompletion:
        texts = ["".join(parts) for parts in self._texts]
        plan = self.plan
        if plan.operation == "chat":
            return ChatCompletion(
                id=plan.response_id,
                created=plan.created,
                model=plan.model,
                choices=[
                    ChatChoice(index=i, message=self._message(i, text),
                               finish_reason=self._finish[i],
                               logprobs=chat_logprobs(self._rows[i]) if plan.logprobs else None)
                    for i, text in enumerate(texts)
                ],
                usage=usage,
                prompt_logprobs=(prompt_logprobs(self._shared_prompt_rows(0))
                                 if plan.show_prompt_logprobs else UNSET),
            )
        choices = []
        for i, text in enumerate(texts):
            # With n > 1 the prompt is computed once, by one of the choices.
            prompt_rows = self._shared_prompt_rows(i)
            echo = self._echo[i] or next((e for e in self._echo if e), None)
            choices.append(CompletionChoice(
                index=i, text=plan.echo_prefix(echo) + text, finish_reason=self._finish[i],
                logprobs=_completion_logprobs(plan, self._rows[i], prompt_rows, echo, 0),
                prompt_logprobs=(prompt_logprobs(prompt_rows) if plan.show_prompt_logprobs
                                 else UNSET),
            ))
        return Completion(id=plan.response_id, created=plan.created, model=plan.model,
                          choices=choices, usage=usage)

    def _message(self, i: int, text: str) -> AssistantMessage:
        """Choice ``i``'s message: with calls, ``tool_calls`` and a content that is
        null when only whitespace is left around them (as OpenAI and vLLM send)."""
        calls = self._calls[i].render()
        if not calls:
            return AssistantMessage(content=text)
        return AssistantMessage(content=text if text.strip() else None, tool_calls=calls)

    def _shared_prompt_rows(self, i: int) -> list[TokenRow]:
        return self._prompt_rows[i] or next((r for r in self._prompt_rows if r), [])


def _completion_logprobs(plan: GenerationPlan, rows: list[TokenRow],
                         prompt_rows: list[TokenRow], echo: tuple[str, str] | None,
                         text_start: int) -> CompletionLogprobs | None:
    """The completions ``logprobs`` object of some tokens; with ``echo``, the
    prompt's come first (the update or response that carries the echoed text)."""
    if not plan.logprobs:
        return None
    if plan.echo and echo is not None:
        return completion_logprobs(rows, prompt_rows, echo[1], text_start)
    return completion_logprobs(rows, text_start=text_start)
