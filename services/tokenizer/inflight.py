"""The requests one tokenizer replica detokenizes, as a pure state table.

The actor (service.py) turns messages into calls on ``InflightRequests`` and sends
what the returned ``Outcome`` says; nothing here does I/O, so every rule below is
unit-tested without sockets.

Rules:
- A ``TokenOutput`` carries ``num_prior``, the output ids its request had before
  it. Ids already seen (a duplicate after a retry) are skipped; a gap (ids this
  replica never saw) cannot be detokenized and fails the request.
- ``TextDelta.offset`` counts characters (code points) released before the delta.
  A ``Reassign`` rebuilds the request from all its ids and releases its text again
  from offset 0; the api drops what it already delivered.
- A stop-string match ends the request here, before the scheduler knows: the
  outcome lists it for an ``Abort(reason="stop")``. A finish reported by the
  scheduler flushes whatever text was held back.
- Ids of requests that ended here recently are expected stragglers (the scheduler
  had already planned another step) and are ignored; other unknown ids are
  reported so the actor can log them and tell the scheduler to stop them.
- Each request keeps what a resubmission needs (``ResumeSpec``: prompt, its own
  sampling with its choice seed, priority, salt) and the output ids seen so far.
  When the scheduler restarts, ``resumptions`` turns every held request into a
  resuming ``Submit``; its detokenizer state stays, so the text goes on from where
  it was, without a repeated or missing character.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from services.tokenizer.detokenizer import RequestDetokenizer
from services.tokenizer.logprob_text import with_token_text
from services.tokenizer.tool_parsers import ToolCallParser, make_parser, parser_problem
from shared.protocol.envelope import unpack_i32
from shared.protocol.generation import (
    DetokenizeSpec,
    Reassign,
    RequestFailed,
    SamplingParams,
    Submit,
    TextDelta,
    TokenOutput,
    stop_strings_problem,
)
from shared.protocol.logprobs import Logprobs
from shared.protocol.tools import ToolCallDelta
from shared.recent_ids import RecentIds

# Ended requests remembered so their late outputs are recognised as stragglers.
RECENTLY_ENDED = 8192


class CorruptOutput(ValueError):
    """Output ids that cannot be detokenized (bad packing, a gap, ids out of range)."""


@dataclass(frozen=True, slots=True)
class ResumeSpec:
    """What resubmitting a request needs besides its output ids. ``sampling`` is the
    request's own: a choice of an n > 1 request carries its choice seed."""

    prompt_token_ids: bytes  # packed int32
    sampling: SamplingParams
    detokenize: DetokenizeSpec
    priority: int = 0
    cache_salt: str = ""


@dataclass(slots=True)
class InflightRequest:
    """One request's detokenization state. ``trace`` is the actor's opaque trace
    context, kept so the request's finish joins its trace. ``output_ids`` are the
    ids detokenized so far (``completion_tokens`` of them); ``resume`` is None for
    a request that cannot be resubmitted (reassigned by a scheduler that did not
    say how it samples)."""

    request_id: str
    prompt_tokens: int
    detokenizer: RequestDetokenizer
    trace: object = None
    completion_tokens: int = 0
    emitted_chars: int = 0
    output_ids: array[int] = field(default_factory=lambda: array("i"))
    resume: ResumeSpec | None = None
    echo_text: str | None = None  # echo: the prompt's text, sent with the first delta
    echo_first_token: str = ""  # echo: the first prompt token's text
    tool_parser: ToolCallParser | None = None  # splits calls from content, if asked

    def resumption(self) -> Submit | None:
        """The Submit that resumes this request at a new scheduler incarnation."""
        spec = self.resume
        if spec is None:
            return None
        return Submit(
            request_id=self.request_id,
            prompt_token_ids=spec.prompt_token_ids,
            sampling=spec.sampling,
            detokenize=spec.detokenize,
            priority=spec.priority,
            cache_salt=spec.cache_salt,
            output_token_ids=self.output_ids.tobytes(),
            resumed=True,
        )


@dataclass(frozen=True, slots=True)
class Finished:
    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    trace: object


@dataclass(slots=True)
class Outcome:
    """What the actor must send after one message."""

    deltas: list[TextDelta] = field(default_factory=list)  # one TextBatch to the api
    stopped: list[str] = field(default_factory=list)  # Abort(reason="stop") to the scheduler
    failed: list[RequestFailed] = field(default_factory=list)  # to the api
    orphaned: list[str] = field(default_factory=list)  # Abort to the scheduler: no one reads them
    unknown: list[str] = field(default_factory=list)  # never held here (subset of orphaned)
    finished: list[Finished] = field(default_factory=list)  # ended normally, for telemetry
    stragglers: int = 0  # outputs of recently ended requests, ignored


def spec_problem(spec: DetokenizeSpec) -> str | None:
    """Why a ``DetokenizeSpec`` that came in from a socket (a GenerateRequest from
    the api, a Reassign from the scheduler) cannot be served, or None: checked
    before ``admit``, which would pay per stop-string prefix or fail on the parser."""
    if problem := stop_strings_problem(spec.stop):
        return f"`stop`: {problem}"
    return parser_problem(spec.tool_parser)


class InflightRequests:
    """Detokenization state of every request this replica holds. Pure, no I/O."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._requests: dict[str, InflightRequest] = {}
        self._recently_ended: RecentIds[str] = RecentIds(RECENTLY_ENDED)

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def get(self, request_id: str) -> InflightRequest | None:
        return self._requests.get(request_id)

    def ids(self) -> list[str]:
        return list(self._requests)

    def admit(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        spec: DetokenizeSpec,
        trace: object = None,
        resume: ResumeSpec | None = None,
    ) -> InflightRequest:
        """Start holding a request that was just submitted."""
        assert request_id not in self._requests, f"{request_id} admitted twice"
        state = InflightRequest(
            request_id=request_id,
            prompt_tokens=len(prompt_ids),
            detokenizer=RequestDetokenizer(self._tokenizer, prompt_ids, spec),
            trace=trace,
            resume=resume,
            # vLLM decodes an echoed prompt with its special tokens.
            echo_text=(self._tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
                       if spec.echo else None),
            echo_first_token=(self._tokenizer.decode([prompt_ids[0]], skip_special_tokens=False)
                              if spec.echo and prompt_ids else ""),
            tool_parser=(make_parser(spec.tool_parser, spec.tool_function, spec.tool_parallel)
                         if spec.tool_parser else None),
        )
        self._requests[request_id] = state
        self._recently_ended.discard(request_id)
        return state

    def drop(self, request_id: str) -> InflightRequest | None:
        """Forget a request (aborted, failed upstream). Idempotent."""
        state = self._requests.pop(request_id, None)
        self._recently_ended.add(request_id)
        return state

    def drop_all(self) -> list[InflightRequest]:
        """Forget every request (an upstream restarted and lost them)."""
        states = list(self._requests.values())
        for state in states:
            self.drop(state.request_id)
        return states

    def resumptions(self) -> tuple[list[tuple[Submit, InflightRequest]], list[InflightRequest]]:
        """The scheduler restarted and knows none of our requests: a resuming Submit
        for each held request (kept, its text goes on), and the ones that cannot be
        resumed (dropped here; the actor fails them)."""
        resumed: list[tuple[Submit, InflightRequest]] = []
        lost: list[InflightRequest] = []
        for state in list(self._requests.values()):
            submit = state.resumption()
            if submit is None:
                self.drop(state.request_id)
                lost.append(state)
            else:
                resumed.append((submit, state))
        return resumed, lost

    def apply(self, outputs: Sequence[TokenOutput]) -> Outcome:
        """One ``TokenBatch``: new ids of some requests -> at most one delta each."""
        outcome = Outcome()
        for output in outputs:
            state = self._requests.get(output.request_id)
            if state is None:
                if output.request_id in self._recently_ended:
                    outcome.stragglers += 1
                else:
                    outcome.unknown.append(output.request_id)
                    outcome.orphaned.append(output.request_id)
                continue
            try:
                new_ids = self._new_ids(state, output)
            except CorruptOutput as e:
                self._fail(state, str(e), outcome)
                continue
            # Logprob rows match token_ids one to one; skip those of ids seen already.
            skip = len(output.logprobs) - len(new_ids) if output.logprobs else 0
            self._advance(state, new_ids, output.finish_reason, outcome,
                          logprobs=output.logprobs[max(skip, 0):],
                          prompt_logprobs=output.prompt_logprobs)
        return outcome

    def reassign(self, message: Reassign, trace: object = None) -> Outcome:
        """Take over a request from a replica that died: rebuild its state from all
        its ids and release its whole text again, from offset 0."""
        outcome = Outcome()
        try:
            prompt_ids = self._unpack(message.request_id, message.prompt_token_ids)
            output_ids = self._unpack(message.request_id, message.output_token_ids)
            self._check_range(message.request_id, output_ids)
            if problem := spec_problem(message.detokenize):
                raise CorruptOutput(f"{message.request_id}: {problem}")
        except CorruptOutput as e:
            self._requests.pop(message.request_id, None)
            outcome.failed.append(_server_error(message.request_id, str(e)))
            outcome.orphaned.append(message.request_id)
            self._recently_ended.add(message.request_id)
            return outcome
        self._requests.pop(message.request_id, None)
        resume = None
        if message.sampling is not None:
            resume = ResumeSpec(message.prompt_token_ids, message.sampling,
                                message.detokenize, message.priority, message.cache_salt)
        state = self.admit(message.request_id, prompt_ids, message.detokenize, trace, resume)
        self._advance(state, output_ids, message.finish_reason, outcome, always_emit=True)
        return outcome

    def _advance(
        self,
        state: InflightRequest,
        new_ids: Sequence[int],
        finish_reason: str | None,
        outcome: Outcome,
        *,
        always_emit: bool = False,
        logprobs: Sequence[Logprobs] = (),
        prompt_logprobs: Sequence[Logprobs] = (),
    ) -> None:
        detokenizer = state.detokenizer
        text, consumed = detokenizer.push_many(new_ids)
        # Tokens past a stop string are not output: neither are their logprobs.
        rows = with_token_text(self._tokenizer, logprobs[:consumed])
        prompt_rows = with_token_text(self._tokenizer, prompt_logprobs)
        state.completion_tokens += consumed
        state.output_ids.extend(new_ids[:consumed])
        finish: str | None = None
        if detokenizer.stopped:
            finish = "stop"
            if finish_reason is None:
                # The scheduler does not know yet: it must stop generating.
                outcome.stopped.append(state.request_id)
        elif finish_reason is not None:
            # Held-back text can no longer grow into a stop string or a character.
            text += detokenizer.finish()
            finish = "stop" if detokenizer.stopped else finish_reason
        text, calls, finish = _split_calls(state.tool_parser, text, finish)
        if text or calls or finish is not None or always_emit or rows or prompt_rows:
            outcome.deltas.append(
                TextDelta(
                    request_id=state.request_id,
                    text=text,
                    offset=state.emitted_chars,
                    prompt_tokens=state.prompt_tokens,
                    completion_tokens=state.completion_tokens,
                    finish_reason=finish,
                    logprobs=rows,
                    prompt_logprobs=prompt_rows,
                    prompt_text=state.echo_text,
                    prompt_first_token=state.echo_first_token if state.echo_text else "",
                    tool_calls=calls,
                )
            )
            state.emitted_chars += len(text)
            state.echo_text = None
        if finish is not None:
            self.drop(state.request_id)
            outcome.finished.append(
                Finished(
                    state.request_id,
                    finish,
                    state.prompt_tokens,
                    state.completion_tokens,
                    state.trace,
                )
            )

    def _new_ids(self, state: InflightRequest, output: TokenOutput) -> Sequence[int]:
        ids = self._unpack(output.request_id, output.token_ids)
        already_seen = state.completion_tokens - output.num_prior
        if already_seen < 0:
            raise CorruptOutput(
                f"output of {output.request_id} starts after output id {output.num_prior}, "
                f"but this tokenizer has seen only {state.completion_tokens}"
            )
        new_ids = ids[already_seen:]
        self._check_range(output.request_id, new_ids)
        return new_ids

    @staticmethod
    def _unpack(request_id: str, packed: bytes) -> Sequence[int]:
        if len(packed) % 4:
            raise CorruptOutput(f"token ids of {request_id} are not packed int32")
        return unpack_i32(packed)

    def _check_range(self, request_id: str, ids: Sequence[int]) -> None:
        if ids and not (min(ids) >= 0 and max(ids) < self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise CorruptOutput(f"token id {bad} of {request_id} is outside the vocabulary")

    def _fail(self, state: InflightRequest, reason: str, outcome: Outcome) -> None:
        self.drop(state.request_id)
        outcome.failed.append(_server_error(state.request_id, reason))
        outcome.orphaned.append(state.request_id)


def _split_calls(
    parser: ToolCallParser | None, text: str, finish: str | None
) -> tuple[str, list[ToolCallDelta], str | None]:
    """(content, call deltas, finish reason) of new output text: the parser's split
    when the request parses calls, and "tool_calls" for a stop after calls."""
    if parser is None:
        return text, [], finish
    parsed = parser.push(text)
    content, calls = parsed.content, parsed.calls
    if finish is not None:
        tail = parser.finish()
        content, calls = content + tail.content, calls + tail.calls
        if finish == "stop" and parser.called:
            finish = "tool_calls"
    return content, calls, finish


def _server_error(request_id: str, reason: str) -> RequestFailed:
    return RequestFailed(request_id, 500, "server_error", f"detokenization failed: {reason}")
