"""One step's sampling with everything a request may ask on top of picking a token:
bad words, ``logit_bias``, penalties, ``min_p`` (``logits_processing.py``) and the
logprobs of sampled and prompt tokens.

Only requests that ask pay: a step of plain requests is ``Sampler.sample_ids`` on
the raw logits; logprobs are one ``log_softmax`` + ``topk`` over just the rows that
want them (sampled rows and prompt rows together), and their values leave the
device with the sampled ids (``HostLogprobs``), never with a sync of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.worker.grammar import StepMask
from services.worker.logits_processing import LogitAdjustments, PenaltyTable, banned_tokens
from services.worker.sampling import Sampler
from services.worker.step_batch import RequestState
from shared.protocol.logprobs import Logprobs, pack_logprobs


@dataclass(frozen=True, slots=True)
class PromptSpan:
    """Prompt positions ``first .. first + count - 1`` of request ``index`` (plan
    order) computed in this step whose next token is still prompt: their logits
    give the logprobs of tokens ``first + 1 ..``."""

    index: int
    first: int
    count: int


def prompt_spans(states: Sequence[RequestState], num_tokens: Sequence[int]) -> list[PromptSpan]:
    """The step's rows whose prompt logprobs were asked for."""
    spans = []
    for i, (state, n) in enumerate(zip(states, num_tokens, strict=True)):
        end = min(state.num_computed + n, state.prompt_logprobs_end)
        if end > state.num_computed:
            spans.append(PromptSpan(i, state.num_computed, end - state.num_computed))
    return spans


@dataclass(slots=True)
class DeviceLogprobs:
    """Logprob rows still on the device, and whose they are: ``entries`` are
    (plan index, start position, first row, rows, num_top, is_prompt)."""

    entries: list[tuple[int, int, int, int, int, bool]]
    token_ids: torch.Tensor  # int32 [rows, 1 + K]
    values: torch.Tensor  # float32 [rows, 1 + K]
    ranks: torch.Tensor  # int32 [rows]

    def to_host(self, pinned: bool) -> DeviceLogprobs:
        """Start the copy to the host (non-blocking into pinned memory on CUDA: wait
        for the step's copy event before reading)."""
        def copy(t: torch.Tensor) -> torch.Tensor:
            if not pinned:
                return t.cpu()
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host
        return DeviceLogprobs(self.entries, copy(self.token_ids), copy(self.values),
                              copy(self.ranks))

    def unpack(self) -> tuple[dict[int, Logprobs], list[tuple[int, Logprobs]]]:
        """(sampled logprobs by plan index, prompt logprobs with their plan index);
        call on host tensors only."""
        ids, values, ranks = self.token_ids.tolist(), self.values.tolist(), self.ranks.tolist()
        sampled: dict[int, Logprobs] = {}
        prompt: list[tuple[int, Logprobs]] = []
        for index, start, first, rows, num_top, is_prompt in self.entries:
            width = 1 + num_top
            flat_ids = [t for row in ids[first:first + rows] for t in row[:width]]
            flat_values = [v for row in values[first:first + rows] for v in row[:width]]
            packed = pack_logprobs(start, num_top, flat_ids, flat_values,
                                   ranks[first:first + rows])
            if is_prompt:
                prompt.append((index, packed))
            else:
                sampled[index] = packed
        return sampled, prompt


class StepSampler:
    """Samples a step's rows for the runner and keeps the per-request device state
    that needs (the penalty counts)."""

    def __init__(self, sampler: Sampler, vocab_size: int, device: torch.device) -> None:
        self.sampler = sampler
        self.penalties = PenaltyTable(vocab_size, device)

    def register(self, state: RequestState) -> None:
        if state.sampling.penalized:
            prompt_len = len(state.token_ids) - state.num_output_tokens
            self.penalties.add(state.request_id, state.token_ids[:prompt_len],
                               state.token_ids[prompt_len:])

    def drop(self, request_id: str) -> None:
        self.penalties.drop(request_id)

    def reset(self) -> None:
        self.penalties.clear()

    def sample(
        self,
        logits: torch.Tensor,
        states: Sequence[RequestState],
        samplers: Sequence[int],
        spans: Sequence[PromptSpan],
        outputs_of: Callable[[RequestState], list[int]],
        mask: StepMask | None = None,
    ) -> tuple[torch.Tensor, DeviceLogprobs | None]:
        """(sampled ids [len(samplers)] on the device, logprobs or None).
        ``logits`` holds the sampled rows (``states[samplers[j]]`` in row j), then
        the prompt rows of ``spans`` in order. ``outputs_of`` gives a request's
        output ids with none pending (bad words need the last ones). ``mask``: the
        grammar mask of constrained rows, applied first (in place: like vLLM, their
        logprobs see disallowed tokens as -inf)."""
        if mask is not None:
            mask.apply(logits)
        raw = logits[: len(samplers)]
        chosen_states = [states[i] for i in samplers]
        params = [s.sampling for s in chosen_states]
        adjust = self._adjustments(chosen_states, outputs_of)
        adjusted = raw if adjust is None else adjust.apply(raw, self.penalties)
        ids = self.sampler.sample_ids(adjusted, params,
                                      [s.num_output_tokens for s in chosen_states])
        if adjust is not None and adjust.penalty_rows:
            assert adjust.penalty_slots is not None
            rows = torch.tensor(adjust.penalty_rows, device=ids.device)
            self.penalties.record(adjust.penalty_slots, ids[rows])
        return ids, self._logprobs(logits, ids, states, samplers, spans)

    def _adjustments(self, states: Sequence[RequestState],
                     outputs_of: Callable[[RequestState], list[int]]) -> LogitAdjustments | None:
        adjust: LogitAdjustments | None = None
        for row, state in enumerate(states):
            p = state.sampling
            if not (p.bad_words_token_ids or p.logit_bias or p.penalized):
                continue
            if adjust is None:
                adjust = LogitAdjustments()
            words = p.bad_words_token_ids
            outputs = outputs_of(state) if any(len(w) > 1 for w in words) else []
            adjust.add_row(row, p, banned_tokens(p, outputs) if words else [])
            if p.penalized:
                adjust.add_penalties(row, p)
        if adjust is not None and adjust.penalty_rows:
            adjust.penalty_slots = self.penalties.slots(
                [states[row].request_id for row in adjust.penalty_rows])
        return adjust

    def _logprobs(self, logits: torch.Tensor, ids: torch.Tensor,
                  states: Sequence[RequestState], samplers: Sequence[int],
                  spans: Sequence[PromptSpan]) -> DeviceLogprobs | None:
        rows = [j for j, i in enumerate(samplers) if states[i].sampling.logprobs >= 0]
        if not rows and not spans:
            return None
        device = logits.device
        entries = []
        for n, j in enumerate(rows):
            state = states[samplers[j]]
            entries.append((samplers[j], len(state.token_ids), n, 1,
                            state.sampling.logprobs, False))
        next_tokens: list[int] = []
        first = len(rows)
        for span in spans:
            state = states[span.index]
            entries.append((span.index, span.first + 1, first, span.count,
                            state.sampling.prompt_logprobs, True))
            next_tokens += state.token_ids[span.first + 1: span.first + 1 + span.count]
            first += span.count
        picked = torch.cat([
            logits[torch.tensor(rows, device=device, dtype=torch.long)],
            logits[len(samplers):],
        ])
        chosen = torch.cat([ids[torch.tensor(rows, device=device, dtype=torch.long)],
                            torch.tensor(next_tokens, device=device, dtype=torch.long)])
        num_top = max(e[4] for e in entries)
        return token_logprobs(picked, chosen, num_top, entries)


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, num_top: int,
                   entries: list[tuple[int, int, int, int, int, bool]]) -> DeviceLogprobs:
    """log_softmax of each row, the chosen token's value and rank (how many tokens
    are at least as likely: vLLM's rank, 1 for the most likely), and the row's
    ``num_top`` best."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen_values = logprobs.gather(1, chosen[:, None])
    ranks = (logprobs >= chosen_values).sum(dim=-1)
    token_ids = chosen[:, None]
    values = chosen_values
    if num_top > 0:
        top = logprobs.topk(num_top, dim=-1)
        token_ids = torch.cat([token_ids, top.indices], dim=1)
        values = torch.cat([values, top.values], dim=1)
    return DeviceLogprobs(entries, token_ids.to(torch.int32), values,
                          ranks.to(torch.int32))
