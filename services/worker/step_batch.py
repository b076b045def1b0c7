"""Turning one step's work (which requests compute how many tokens) into the flat
token batch and attention metadata the model runs on.

Everything per token is built with tensor ops once per step; the Python loop is
per request (and only slices lists for prefill chunks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.worker.attention import AttentionMetadata, PrefillChunk
from shared.protocol.generation import SamplingParams

# A sampled token whose value is still on the device: the step that sampled it is
# launched but not collected (see ``ModelRunner.launch``). Its slot in
# ``RequestState.token_ids`` is filled when the step is collected.
PENDING = -1


@dataclass(slots=True)
class RequestState:
    """What the worker keeps about a running request between steps."""

    request_id: str
    token_ids: list[int]  # prompt, then every sampled token (the last is the next input)
    num_computed: int  # how many of token_ids have their K/V in the cache
    block_ids: list[int]  # the block table, append-only while the request lives
    sampling: SamplingParams
    num_output_tokens: int  # how many of token_ids are outputs (the seeded noise index)
    # Prompt logprobs: positions below this still owe theirs (the logits at p give
    # token p + 1's); 0 when not asked, or already sent before a recompute.
    prompt_logprobs_end: int = 0


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # [T] long, on the device
    positions: torch.Tensor  # [T] long
    meta: AttentionMetadata
    # Flat rows whose logits are sampled (each the last token of a request whose
    # computed count reaches its token count), and those requests' indices.
    sample_rows: torch.Tensor  # [S] long
    samplers: list[int]
    row_start: list[int]  # per request (plan order): its first token's flat row


def blocks_for(num_positions: int, block_size: int) -> int:
    return -(-num_positions // block_size)


def build_step_batch(
    states: Sequence[RequestState],
    num_tokens: Sequence[int],
    block_size: int,
    device: torch.device,
) -> StepBatch:
    """``states[i]`` computes ``num_tokens[i]`` tokens from its ``num_computed``.
    The caller has checked that tokens and block tables cover those positions."""
    # Decodes first, then prefill chunks (the layout attention.py documents).
    order = [i for i, n in enumerate(num_tokens) if n == 1]
    num_decodes = len(order)
    order += [i for i, n in enumerate(num_tokens) if n != 1]
    input_ids: list[int] = []
    positions: list[int] = []
    table_rows: list[list[int]] = []
    sample_rows: list[int] = []
    samplers: list[int] = []
    row_start = [0] * len(states)
    for i in order:
        row_start[i] = len(input_ids)
        state, n = states[i], num_tokens[i]
        start = state.num_computed
        end = start + n
        if n == 1:
            input_ids.append(state.token_ids[start])
            positions.append(start)
        else:
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
        table_rows.append(state.block_ids[: blocks_for(end, block_size)])
        if end == len(state.token_ids):
            sample_rows.append(len(input_ids) - 1)
            samplers.append(i)
    width = max(len(row) for row in table_rows)
    tables = torch.tensor([row + [0] * (width - len(row)) for row in table_rows]).to(device)
    token_rows = torch.repeat_interleave(
        torch.arange(len(order)),
        torch.tensor([num_tokens[i] for i in order]),
        output_size=len(input_ids),
    ).to(device)
    ids_t = torch.tensor(input_ids).to(device)
    pos_t = torch.tensor(positions).to(device)
    slot_mapping = tables[token_rows, pos_t // block_size] * block_size + pos_t % block_size

    prefills: list[PrefillChunk] = []
    token_start = num_decodes
    for row in range(num_decodes, len(order)):
        state, n = states[order[row]], num_tokens[order[row]]
        prefills.append(
            PrefillChunk(
                token_start=token_start,
                num_tokens=n,
                context_start=state.num_computed,
                block_ids=tables[row, : len(table_rows[row])],
            )
        )
        token_start += n
    decode_width = max((len(row) for row in table_rows[:num_decodes]), default=0)
    meta = AttentionMetadata(
        block_size=block_size,
        slot_mapping=slot_mapping,
        num_decodes=num_decodes,
        decode_block_tables=tables[:num_decodes, :decode_width],
        decode_context_lens=pos_t[:num_decodes] + 1,
        prefills=prefills,
    )
    return StepBatch(
        input_ids=ids_t,
        positions=pos_t,
        meta=meta,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long).to(device),
        samplers=samplers,
        row_start=row_start,
    )
