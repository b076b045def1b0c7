"""Log-probabilities of tokens, as they travel worker -> scheduler -> tokenizer -> api.

One ``Logprobs`` holds consecutive rows of one request: a sampled token (one row per
step) or a prefill chunk's prompt tokens (one row per position). Every row has the
token itself first, then the request's ``num_top`` most likely tokens, most likely
first, as packed arrays (no Python object per token on the wire):

    token_ids  int32   [rows, 1 + num_top]
    logprobs   float32 [rows, 1 + num_top]
    ranks      int32   [rows]   rank of the row's own token (1: the most likely)

The values are the model's raw log-probabilities (``log_softmax`` of the logits,
before penalties, biases or temperature), as vLLM reports them by default.
``tokens`` is empty until the tokenizer fills in each id's text (same layout as
``token_ids``).
"""

from __future__ import annotations

from array import array

import msgspec


class Logprobs(msgspec.Struct, frozen=True, array_like=True, gc=False):
    start: int  # position (in prompt + outputs) of the first row's token
    num_top: int
    token_ids: bytes
    logprobs: bytes
    ranks: bytes
    tokens: list[str] = []

    @property
    def width(self) -> int:
        return 1 + self.num_top

    @property
    def num_rows(self) -> int:
        return len(self.ranks) // 4

    def unpack(self) -> tuple[array[int], array[float], array[int]]:
        """(token ids, logprobs, ranks); raises ValueError when the arrays disagree."""
        ids, values, ranks = array("i"), array("f"), array("i")
        ids.frombytes(self.token_ids)
        values.frombytes(self.logprobs)
        ranks.frombytes(self.ranks)
        if self.num_top < 0 or len(ids) != len(values) or len(ids) != len(ranks) * self.width:
            raise ValueError("logprobs arrays of mismatched sizes")
        if self.tokens and len(self.tokens) != len(ids):
            raise ValueError("logprobs tokens of a mismatched size")
        return ids, values, ranks


def pack_logprobs(start: int, num_top: int, token_ids: list[int], logprobs: list[float],
                  ranks: list[int]) -> Logprobs:
    return Logprobs(start, num_top, array("i", token_ids).tobytes(),
                    array("f", logprobs).tobytes(), array("i", ranks).tobytes())
