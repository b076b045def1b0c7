"""The mesh's packed ``Logprobs`` rows -> OpenAI's logprob objects
(``logprob_schema.py``). Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.api.logprob_schema import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)
from shared.protocol.logprobs import Logprobs

FLOOR = -9999.0  # what -inf is sent as


@dataclass(frozen=True, slots=True)
class TokenRow:
    """One token's logprob row: itself, then the top ones, most likely first."""

    token_id: int
    token: str
    logprob: float
    rank: int
    top: list[tuple[int, str, float]]


def token_rows(chunks: Sequence[Logprobs]) -> list[TokenRow]:
    rows = []
    for chunk in chunks:
        ids, values, ranks = chunk.unpack()
        width = chunk.width
        tokens = chunk.tokens or [str(t) for t in ids]
        for r in range(chunk.num_rows):
            at = r * width
            rows.append(TokenRow(
                ids[at], tokens[at], max(values[at], FLOOR), ranks[r],
                [(ids[at + j], tokens[at + j], max(values[at + j], FLOOR))
                 for j in range(1, width)],
            ))
    return rows


def completion_logprobs(rows: Sequence[TokenRow], prompt: Sequence[TokenRow] = (),
                        first_prompt_token: str | None = None,
                        text_start: int = 0) -> CompletionLogprobs:
    """Output rows (after the prompt's, with ``echo``) in the completions shape;
    ``text_offset`` counts characters from ``text_start``."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if first_prompt_token is not None:
        tokens.append(first_prompt_token)
        values.append(None)
        tops.append(None)
    for row in [*prompt, *rows]:
        tokens.append(row.token)
        values.append(row.logprob)
        top = {text: value for _, text, value in row.top}
        top.setdefault(row.token, row.logprob)
        tops.append(top)
    offsets = []
    at = text_start
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops,
                              text_offset=offsets)


def chat_logprobs(rows: Sequence[TokenRow]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(
            token=row.token, logprob=row.logprob, bytes=list(row.token.encode()),
            top_logprobs=[TopLogprob(token=text, logprob=value, bytes=list(text.encode()))
                          for _, text, value in row.top],
        )
        for row in rows
    ])


def prompt_logprobs(rows: Sequence[TokenRow]) -> PromptLogprobs:
    """vLLM's shape: null for the first prompt token, then the token's own entry
    and its top ones, keyed by token id."""
    out: PromptLogprobs = [None]
    for row in rows:
        entry = {str(row.token_id): PromptLogprob(logprob=row.logprob, rank=row.rank,
                                                  decoded_token=row.token)}
        for rank, (token_id, text, value) in enumerate(row.top, start=1):
            entry.setdefault(str(token_id), PromptLogprob(logprob=value, rank=rank,
                                                          decoded_token=text))
        out.append(entry)
    return out
