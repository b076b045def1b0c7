"""The text of each token id in logprobs, as vLLM's OpenAI server shows it: every
id decoded on its own, special tokens kept (``convert_ids_list_to_tokens``)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from tokenizers import Tokenizer

from shared.protocol.logprobs import Logprobs


def with_token_text(tokenizer: Tokenizer, rows: Sequence[Logprobs]) -> list[Logprobs]:
    """``rows`` with ``tokens`` filled in (one batched decode for all of them)."""
    if not rows:
        return []
    unpacked = [r.unpack()[0] for r in rows]
    texts = tokenizer.decode_batch([[t] for ids in unpacked for t in ids],
                                   skip_special_tokens=False)
    out = []
    start = 0
    for row, ids in zip(rows, unpacked, strict=True):
        out.append(msgspec.structs.replace(row, tokens=texts[start:start + len(ids)]))
        start += len(ids)
    return out
