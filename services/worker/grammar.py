"""Structured outputs on the worker: one llguidance matcher per constrained request,
and each step's token mask for the rows that have one.

A request's grammar (``SamplingParams.grammar``, see shared/grammar.py) arrives
once, in its ``NewRequest``; the tokenizer replica compiled it already at
admission (a broken one never gets here). The worker compiles it again, off the
step path: ``register`` hands the compile to a thread (llguidance drops the GIL
while it builds) as soon as the plan is applied, so it runs while the step's
forward does, and the sampling waits for it only if it is not done by then.
Compiled grammars are cached by their string (LRU); each request gets a
``deep_copy`` of the cached matcher (microseconds), so a schema sent by many
requests compiles once.

Each step, for the sampled rows of constrained requests: the matcher catches up
with the request's output ids it has not seen (the runner first makes sure none
is still pending on the device), the masks of all rows are filled at once by
llguidance's thread pool into one int32 bitmask, which goes to the device in one
copy, is unpacked there into a bool mask and sets every disallowed logit to -inf
before any other logit processing. Nothing of this crosses a socket.

A matcher that is stopped (its grammar is complete and allows nothing more) or in
an error state allows only the end-of-sequence tokens: the request ends with
``stop`` at its next token (unless ``ignore_eos`` or ``min_tokens`` hold it, then
it can only repeat EOS until ``max_tokens``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llguidance
import llguidance.torch as llguidance_torch
import torch

from services.worker.step_batch import PENDING, RequestState
from shared.grammar import MAX_GRAMMAR_CHARS

log = logging.getLogger(__name__)

COMPILE_CACHE_SIZE = 128  # distinct grammars kept compiled


@dataclass(slots=True)
class _Constrained:
    """One constrained request: its compiled grammar (maybe still compiling), then
    its own matcher and how many of its output ids that matcher consumed."""

    compiled: Future[llguidance.LLMatcher]
    matcher: llguidance.LLMatcher | None = None
    consumed: int = 0


@dataclass(slots=True)
class StepMask:
    """The grammar mask of one step: ``rows`` (indices into the step's sampled
    rows) and their allowed tokens as an int32 bitmask [len(rows), words] on the
    device (one bit per token id, little-endian within each word)."""

    rows: torch.Tensor
    bitmask: torch.Tensor

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed logits of ``rows`` to -inf, in place, on the device."""
        vocab = logits.shape[1]
        shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
        bits = (self.bitmask[:, :, None] >> shifts) & 1
        allowed = bits.reshape(self.bitmask.shape[0], -1)[:, :vocab].bool()
        logits[self.rows] = logits[self.rows].masked_fill(~allowed, float("-inf"))


class GrammarMatchers:
    """The constrained requests of one worker and their matchers."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: Sequence[int],
                 device: torch.device) -> None:
        self._tokenizer_file = model_dir / "tokenizer.json"
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._device = device
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._compiled: OrderedDict[str, Future[llguidance.LLMatcher]] = OrderedDict()
        self._requests: dict[str, _Constrained] = {}
        self._host: torch.Tensor | None = None  # reused (pinned on CUDA) bitmask buffer
        self._uploaded: torch.cuda.Event | None = None  # the buffer's last copy

    def check(self, grammar: str) -> str | None:
        """Why a request with this grammar cannot run here, or None."""
        if grammar and not self._tokenizer_file.is_file():
            return f"structured outputs need {self._tokenizer_file}, which is missing"
        if len(grammar) > MAX_GRAMMAR_CHARS:
            return f"a grammar of {len(grammar)} characters; at most {MAX_GRAMMAR_CHARS}"
        return None

    def register(self, state: RequestState) -> None:
        grammar = state.sampling.grammar
        if not grammar:
            return
        self._requests[state.request_id] = _Constrained(self._compile(grammar))

    def drop(self, request_id: str) -> None:
        """Forget a request's matcher (finished, aborted or preempted)."""
        self._requests.pop(request_id, None)

    def reset(self) -> None:
        self._requests.clear()

    def close(self) -> None:
        """Stop the compile thread (idempotent); pending compiles are dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def constrained_rows(self, states: Sequence[RequestState]) -> list[int]:
        """Indices of ``states`` that have a grammar."""
        if not self._requests:
            return []
        return [j for j, s in enumerate(states) if s.request_id in self._requests]

    def step_mask(self, states: Sequence[RequestState], rows: Sequence[int]) -> StepMask:
        """The mask of ``states[j]`` for each j in ``rows``; their output ids must be
        on the host (no ``PENDING`` left)."""
        matchers = [self._caught_up(states[j]) for j in rows]
        words = (self._vocab_size + 31) // 32
        host = self._buffer(len(rows), words)
        llguidance_torch.fill_next_token_bitmask_par(
            self._ensure_executor(), [(m, k) for k, m in enumerate(matchers)], host)
        for k, matcher in enumerate(matchers):
            if matcher.is_error():
                self._only_eos(host[k])
        if self._device.type != "cuda":
            return StepMask(torch.tensor(list(rows), dtype=torch.long), host.clone())
        bitmask = host.to(self._device, non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()
        index = torch.tensor(list(rows), dtype=torch.long).to(self._device, non_blocking=True)
        return StepMask(index, bitmask)

    # -- inside --------------------------------------------------------------------

    def _caught_up(self, state: RequestState) -> llguidance.LLMatcher:
        entry = self._requests[state.request_id]
        if entry.matcher is None:
            # Waits only if the compile has not finished while the forward ran.
            entry.matcher = entry.compiled.result().deep_copy()
        prompt_len = len(state.token_ids) - state.num_output_tokens
        outputs = state.token_ids[prompt_len + entry.consumed:]
        assert PENDING not in outputs, "a constrained request's last token is still pending"
        if outputs:
            matcher = entry.matcher
            if not matcher.is_stopped() and not matcher.consume_tokens(outputs):
                log.error("request %s: sampled ids %s rejected by its grammar: %s",
                          state.request_id, outputs, matcher.get_error())
            entry.consumed += len(outputs)
        return entry.matcher

    def _compile(self, grammar: str) -> Future[llguidance.LLMatcher]:
        cached = self._compiled.get(grammar)
        if cached is not None:
            self._compiled.move_to_end(grammar)
            return cached
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        future = self._pool.submit(self._build, grammar)
        self._compiled[grammar] = future
        if len(self._compiled) > COMPILE_CACHE_SIZE:
            self._compiled.popitem(last=False)
        return future

    def _build(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._ensure_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            # The tokenizer replica compiled it at admission: a mismatch of the two
            # tokenizer files, not client input. The request ends at its next token.
            log.error("grammar failed to compile on the worker: %s", matcher.get_error())
        return matcher

    def _ensure_tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (tens of ms for a large vocabulary): models that never
        # see a grammar never pay it. Only the compile thread calls this.
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(
                str(self._tokenizer_file), n_vocab=self._vocab_size, eos_token=self._eos)
        return self._tokenizer

    def _ensure_executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        return self._executor

    def _buffer(self, rows: int, words: int) -> torch.Tensor:
        """A [rows, words] int32 host buffer; on CUDA pinned and reused, after its
        previous upload finished."""
        if self._device.type != "cuda":
            return torch.zeros((rows, words), dtype=torch.int32)
        if self._uploaded is not None:
            self._uploaded.synchronize()
        if self._host is None or self._host.shape[0] < rows:
            self._host = torch.zeros((max(rows, 64), words), dtype=torch.int32, pin_memory=True)
        return self._host[:rows]

    def _only_eos(self, row: torch.Tensor) -> None:
        row.zero_()
        for token in self._eos:
            row[token // 32] |= _bit(token % 32)


def _bit(position: int) -> int:
    """Bit ``position`` of an int32 word, as a signed value (bit 31 is negative)."""
    value = 1 << position
    return value - (1 << 32) if value >= 1 << 31 else value
