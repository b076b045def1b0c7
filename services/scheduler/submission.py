"""What a ``Submit`` asks the scheduler for: its token ids, and why it may be
refused. Pure.

A Submit is a new request, or a *resumption* (``resumed``): after a scheduler
restart the tokenizer that detokenizes a request re-sends it with the output ids
it had generated (``output_token_ids``). A resumption is queued like a new request
whose tokens are prompt + outputs, exactly like a recompute preemption: the worker
prefills them all (their K/V are recomputed; the prefix cache may hit), while the
request keeps its own prompt length, so max_tokens, min_tokens, the model length,
usage and ``TokenOutput.num_prior`` continue where they stopped, and seeded noise
continues at output index len(outputs) (``NewRequest.num_output_tokens``): a
seeded request resumes exactly as it would have run, a greedy one too.
"""

from __future__ import annotations

from array import array

from services.scheduler.config import SchedulerConfig
from services.scheduler.waiting_queue import QueueBounds, queue_refusal
from shared.protocol.envelope import unpack_i32
from shared.protocol.generation import Submit

INVALID = "invalid_request_error"


def tokens(msg: Submit) -> tuple[array[int], int]:
    """The request's token ids (its prompt, then a resumption's outputs) and its
    prompt length. Call after ``refusal`` said the arrays are well formed."""
    ids = unpack_i32(msg.prompt_token_ids)
    prompt_len = len(ids)
    if msg.output_token_ids:
        ids.frombytes(msg.output_token_ids)
    return ids, prompt_len


def _malformed(msg: Submit) -> str | None:
    for name in ("prompt_token_ids", "output_token_ids"):
        packed: bytes = getattr(msg, name)
        if len(packed) % 4:
            return f"{name} is not packed int32 ({len(packed)} bytes)"
        if packed and min(unpack_i32(packed)) < 0:
            return f"{name} holds a negative token id"
    num_outputs = len(msg.output_token_ids) // 4
    if num_outputs and not msg.resumed:
        return "output_token_ids is only for a resumption (resumed=true)"
    if msg.resumed and msg.n != 1:
        return f"a resumption names one request (a choice resumes under its id), not n={msg.n}"
    if msg.resumed and num_outputs and num_outputs >= msg.sampling.max_tokens:
        return (f"the resumed request has {num_outputs} outputs already, "
                f"max_tokens is {msg.sampling.max_tokens}")
    return None


def refusal(msg: Submit, max_model_len: int, queue: QueueBounds, config: SchedulerConfig
            ) -> tuple[int, str, str] | None:
    """(HTTP status, error type, message) for a Submit that cannot be queued, or
    None. ``max_model_len`` 0: no worker yet, no limit known."""
    malformed = _malformed(msg)
    if malformed is not None:
        return 400, INVALID, malformed
    prompt_len = len(msg.prompt_token_ids) // 4
    total = prompt_len + len(msg.output_token_ids) // 4
    if not prompt_len:
        return 400, INVALID, "the prompt is empty"
    if max_model_len and total >= max_model_len:
        return 400, INVALID, (f"the prompt has {total} tokens; this model serves at "
                              f"most {max_model_len} tokens in all (prompt and output)")
    if msg.n < 1:
        return 400, INVALID, f"n must be at least 1, got {msg.n}"
    # A resumption was admitted before the restart: refusing it now would lose it.
    if msg.resumed:
        return None
    return queue_refusal(queue, config, prompt_len)
