"""What a request's sampling params do to its logits before a token is picked, in
vLLM's order: bad words and ``logit_bias``, then the penalties (``sampling.py``
applies temperature, then ``min_p``, then top-k/top-p).

Everything is batched over the step's rows that ask for it: one gather/scatter per
kind, no Python loop over the vocabulary, and a step whose requests ask for none of
it skips this module entirely.

Penalties (vLLM's formulas, ``vllm/model_executor/layers/utils.py``):

    seen      = token in prompt or output
    logit     = logit / rep if logit > 0 else logit * rep      (where seen)
    logit    -= frequency_penalty * count_in_output + presence_penalty * (count > 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from shared.protocol.generation import SamplingParams


class PenaltyTable:
    """Per penalized request, on the device: how often each token occurs in its
    output (int32) and whether it occurs in its prompt (bool), one row each of two
    ``[capacity, vocab]`` tensors. Rows are updated on the device from the sampled
    ids right after sampling, so a step never waits for its tokens to reach the
    host (the CUDA path feeds them to the next step on the device)."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self.output_counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=device)
        self.prompt_seen = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._slots

    def add(self, request_id: str, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        """Start (or restart, after a recompute preemption) counting for a request."""
        self.drop(request_id)
        slot = self._take()
        self.output_counts[slot].zero_()
        self.prompt_seen[slot].zero_()
        if prompt_ids:
            self.prompt_seen[slot, torch.tensor(list(prompt_ids), device=self.device)] = True
        if output_ids:
            ids = torch.tensor(list(output_ids), device=self.device)
            self.output_counts[slot].index_add_(
                0, ids, torch.ones_like(ids, dtype=torch.int32))
        self._slots[request_id] = slot

    def drop(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    def clear(self) -> None:
        self._free.extend(self._slots.values())
        self._slots.clear()

    def slots(self, request_ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self._slots[r] for r in request_ids], device=self.device)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's sampled token (device tensors, no sync)."""
        self.output_counts.index_put_(
            (slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def apply(self, logits: torch.Tensor, slots: torch.Tensor,
              params: Sequence[SamplingParams]) -> torch.Tensor:
        """vLLM's penalties on ``logits`` [rows, vocab], row i counted in ``slots[i]``."""
        device = logits.device
        counts = self.output_counts[slots]
        in_output = counts > 0
        seen = in_output | self.prompt_seen[slots]
        repetition = torch.tensor([p.repetition_penalty for p in params], device=device)
        factor = torch.where(seen, repetition[:, None], 1.0)
        logits = torch.where(logits > 0, logits / factor, logits * factor)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)
        presence = torch.tensor([p.presence_penalty for p in params], device=device)
        return (logits - frequency[:, None] * counts
                - presence[:, None] * in_output.to(logits.dtype))

    def _take(self) -> int:
        if not self._free:
            capacity = self.output_counts.shape[0]
            grown = max(4, 2 * capacity)
            self.output_counts = torch.cat([self.output_counts, torch.zeros(
                (grown - capacity, self.vocab_size), dtype=torch.int32, device=self.device)])
            self.prompt_seen = torch.cat([self.prompt_seen, torch.zeros(
                (grown - capacity, self.vocab_size), dtype=torch.bool, device=self.device)])
            self._free.extend(range(grown - 1, capacity - 1, -1))
        return self._free.pop()


def banned_tokens(params: SamplingParams, outputs: Sequence[int]) -> list[int]:
    """The tokens ``bad_words`` forbid next: a one-token word always, a longer one's
    last token when the output ends with the rest of it (vLLM's rule)."""
    banned = []
    for word in params.bad_words_token_ids:
        prefix = word[:-1]
        if len(prefix) <= len(outputs) and list(outputs[len(outputs) - len(prefix):]) == prefix:
            banned.append(word[-1])
    return banned


@dataclass(slots=True)
class LogitAdjustments:
    """One step's edits to its sampled rows' logits, built on the host from the
    requests that asked (rows index the step's sampled rows)."""

    banned_rows: list[int] = field(default_factory=list)
    banned_tokens: list[int] = field(default_factory=list)
    bias_rows: list[int] = field(default_factory=list)
    bias_tokens: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    penalty_rows: list[int] = field(default_factory=list)
    penalty_params: list[SamplingParams] = field(default_factory=list)
    penalty_slots: torch.Tensor | None = None

    def add_row(self, row: int, params: SamplingParams, banned: Sequence[int]) -> None:
        self.banned_rows += [row] * len(banned)
        self.banned_tokens += banned
        for token, bias in params.logit_bias.items():
            self.bias_rows.append(row)
            self.bias_tokens.append(token)
            self.bias_values.append(bias)

    def add_penalties(self, row: int, params: SamplingParams) -> None:
        self.penalty_rows.append(row)
        self.penalty_params.append(params)

    def apply(self, logits: torch.Tensor, penalties: PenaltyTable) -> torch.Tensor:
        """The adjusted logits (a new tensor: the raw ones stay for logprobs)."""
        device = logits.device
        logits = logits.clone()
        if self.bias_rows:
            logits.index_put_(
                (torch.tensor(self.bias_rows, device=device),
                 torch.tensor(self.bias_tokens, device=device)),
                torch.tensor(self.bias_values, device=device, dtype=logits.dtype),
                accumulate=True)
        if self.banned_rows:
            logits[torch.tensor(self.banned_rows, device=device),
                   torch.tensor(self.banned_tokens, device=device)] = float("-inf")
        if self.penalty_rows:
            assert self.penalty_slots is not None
            rows = torch.tensor(self.penalty_rows, device=device)
            logits[rows] = penalties.apply(logits[rows], self.penalty_slots,
                                           self.penalty_params)
        return logits


def apply_min_p(scaled: torch.Tensor, min_ps: Sequence[float]) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's largest
    (after temperature, as vLLM does); min_p 0 keeps the row as it is."""
    probs = torch.softmax(scaled, dim=-1)
    floor = torch.tensor(list(min_ps), device=scaled.device)[:, None] * probs.amax(
        dim=-1, keepdim=True)
    return scaled.masked_fill(probs < floor, float("-inf"))
