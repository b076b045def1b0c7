"""In-flight request bookkeeping: which HTTP request a mesh request id belongs to,
which tokenizer replica holds it, and what text the client has been given.

No I/O here. The actor applies mesh messages (``apply``, ``fail``, ``held_by``);
the HTTP handler waits on its ``Flight`` and takes what arrived.

One HTTP request is a ``Flight`` of ``n`` choices; each choice is one mesh
request (``GenerateRequest``). A flight is a one-slot mailbox per choice rather
than a queue of deltas: when the mesh gets ahead of a slow client, new text is
appended to the pending text of its choice (vLLM's output collector merges the
same way), so memory per request is bounded by its output and the actor never
blocks on a client.

Text is deduplicated by character offset: a tokenizer that took over a request
after a failover replays its text from offset 0, and only the part past what was
already delivered reaches the client.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import anyio
from opentelemetry.context import Context

from services.api.errors import ApiError
from services.api.generation_plan import GenerationPlan
from shared.protocol.generation import GenerateRequest, TextDelta
from shared.protocol.logprobs import Logprobs
from shared.protocol.tools import ToolCallDelta
from shared.recent_ids import RecentIds

RECENTLY_CLOSED = 8192  # ids remembered so that late deltas are dropped quietly


@dataclass(slots=True)
class Choice:
    """One mesh request: choice ``index`` of its flight."""

    index: int
    request: GenerateRequest
    holder: bytes | None = None  # identity of the tokenizer replica detokenizing it
    delivered_chars: int = 0  # characters of output accepted so far
    pending: list[str] = field(default_factory=list)  # accepted, not yet taken
    finish_reason: str | None = None
    finish_taken: bool = False
    failed: bool = False  # the mesh ended it with RequestFailed: nothing to abort
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_tokens_at: float | None = None  # when tokens last arrived (monotonic)
    # Gaps between successive tokens, one per token after the first: the samples
    # of vLLM's inter-token latency histogram.
    inter_token_latencies: list[float] = field(default_factory=list)
    # Logprobs accepted, not yet taken; echo's prompt (text, first token's text).
    pending_logprobs: list[Logprobs] = field(default_factory=list)
    pending_prompt_logprobs: list[Logprobs] = field(default_factory=list)
    echo: tuple[str, str] | None = None
    echo_seen: bool = False  # a replayed request echoes its prompt again: ignored
    # Tool calls accepted, not yet taken; argument characters accepted per call
    # (a replay after failover repeats calls from the start: deduplicated alike).
    pending_tool_calls: list[ToolCallDelta] = field(default_factory=list)
    tool_arguments_chars: dict[int, int] = field(default_factory=dict)

    @property
    def has_pending(self) -> bool:
        return bool(self.pending or self.pending_tool_calls)

    def accept_tool_calls(self, deltas: Sequence[ToolCallDelta]) -> bool:
        """Keep what is new in ``deltas``; True if anything was."""
        news = False
        for delta in deltas:
            seen = self.tool_arguments_chars.get(delta.index)
            if seen is None and not delta.name:
                continue  # a call's first delta names it; without it, nothing to render
            start = 0 if seen is None else max(seen - delta.arguments_offset, 0)
            arguments = delta.arguments[start:]
            name = delta.name if seen is None else ""
            if name or arguments:
                self.pending_tool_calls.append(ToolCallDelta(delta.index, name, arguments))
                news = True
            self.tool_arguments_chars[delta.index] = max(
                seen or 0, delta.arguments_offset + len(delta.arguments))
        return news

    def tokens_arrived(self, count: int, now: float) -> None:
        if count <= 0:
            return
        if self.last_tokens_at is not None:
            # Tokens that arrive together (one delta) share the gap evenly.
            self.inter_token_latencies.extend([(now - self.last_tokens_at) / count] * count)
        self.last_tokens_at = now

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def live(self) -> bool:
        """Still running somewhere in the mesh."""
        return not self.finished and not self.failed


@dataclass(frozen=True, slots=True)
class ChoiceUpdate:
    """What one choice produced since the handler last looked."""

    index: int
    text: str
    finish_reason: str | None  # set exactly once, in the update that ends the choice
    logprobs: list[Logprobs] = field(default_factory=list)
    prompt_logprobs: list[Logprobs] = field(default_factory=list)
    echo: tuple[str, str] | None = None  # (prompt text, its first token's text), once
    tool_calls: list[ToolCallDelta] = field(default_factory=list)  # new calls' parts


class DeltaOutcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # text already delivered (a replay after failover)
    GAP = "gap"  # offset past what was delivered: text went missing, accepted anyway
    LATE = "late"  # the request ended recently; expected, dropped quietly
    UNKNOWN = "unknown"  # never heard of it: the sender is confused
    INCONSISTENT = "inconsistent"  # negative offset or counts


class Flight:
    """One HTTP request in flight: its choices and the handler's wake-up."""

    def __init__(self, plan: GenerationPlan, context: Context) -> None:
        self.plan = plan
        self.context = context  # the server span's context: mesh sends go under it
        self.choices = [Choice(i, request) for i, request in enumerate(plan.requests)]
        self.error: ApiError | None = None
        self.closed = False
        self.last_progress = time.monotonic()  # when the mesh last sent something new
        self._first_text_taken = False
        self._news = anyio.Event()

    @property
    def finished(self) -> bool:
        """Every choice ended and the handler has taken all of it."""
        return all(c.finished and c.finish_taken and not c.has_pending for c in self.choices)

    @property
    def prompt_tokens(self) -> int:
        # Every choice has the same prompt; counted once, as OpenAI does.
        return max((c.prompt_tokens for c in self.choices), default=0)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def inter_token_latencies(self) -> list[float]:
        return [gap for c in self.choices for gap in c.inter_token_latencies]

    def finish_reasons(self) -> list[str]:
        return [c.finish_reason for c in self.choices if c.finish_reason is not None]

    def has_news(self) -> bool:
        """Whether the handler has something to take now. A streamed answer takes
        every delta; a buffered one needs its first text (time to first token)
        and then only its ends, so its handler is not woken once per token (at
        256 concurrent requests those wake-ups were most of the api's CPU)."""
        if self.error is not None:
            return True
        if any(c.finished and not c.finish_taken for c in self.choices):
            return True
        wants_text = self.plan.stream or not self._first_text_taken
        return wants_text and any(c.has_pending for c in self.choices)

    async def wait(self) -> None:
        """Until there is text, a finish or an error to take."""
        while not self.has_news():
            if self._news.is_set():
                self._news = anyio.Event()
            await self._news.wait()

    def take(self) -> list[ChoiceUpdate]:
        """Everything new, per choice; raises the flight's error once it failed."""
        if self.error is not None:
            raise self.error
        updates = []
        for choice in self.choices:
            ends = choice.finished and not choice.finish_taken
            if not choice.has_pending and not ends:
                continue
            text = "".join(choice.pending)
            choice.pending.clear()
            choice.finish_taken = choice.finished
            updates.append(ChoiceUpdate(choice.index, text, choice.finish_reason if ends else None,
                                        choice.pending_logprobs, choice.pending_prompt_logprobs,
                                        choice.echo, choice.pending_tool_calls))
            self._first_text_taken = (self._first_text_taken or bool(text)
                                      or bool(choice.pending_tool_calls))
            choice.pending_logprobs, choice.pending_prompt_logprobs = [], []
            choice.pending_tool_calls = []
            choice.echo = None
        return updates

    def fail(self, error: ApiError) -> None:
        if self.error is None:
            self.error = error
        self._news.set()

    def notify(self) -> None:
        self._news.set()


class FlightRegistry:
    """Every in-flight mesh request by id, bounded by ``max_inflight``."""

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self._by_id: dict[str, tuple[Flight, Choice]] = {}
        self._flights: set[Flight] = set()
        self._recently_closed: RecentIds[str] = RecentIds(RECENTLY_CLOSED)

    def __len__(self) -> int:
        return len(self._by_id)

    def flights(self) -> list[Flight]:
        return list(self._flights)

    def open(self, flight: Flight) -> None:
        """Register a flight; 429 ``server_busy`` when it would exceed the bound."""
        if len(self._by_id) + len(flight.choices) > self.max_inflight:
            raise ApiError(
                429,
                f"the server has {len(self._by_id)} requests in flight (limit "
                f"{self.max_inflight}); retry later",
                code="server_busy",
            )
        for choice in flight.choices:
            if choice.request_id in self._by_id:
                raise AssertionError(f"request id {choice.request_id} is already in flight")
        for choice in flight.choices:
            self._by_id[choice.request_id] = (flight, choice)
        self._flights.add(flight)

    def close(self, flight: Flight) -> list[Choice]:
        """Forget a flight; returns its live choices (the caller aborts them).

        Idempotent: a second close returns nothing.
        """
        if flight.closed:
            return []
        flight.closed = True
        if flight not in self._flights:
            return []  # never opened (refused at admission): nothing reached the mesh
        self._flights.discard(flight)
        unfinished = []
        for choice in flight.choices:
            self._by_id.pop(choice.request_id, None)
            self._recently_closed.add(choice.request_id)
            if choice.live:
                unfinished.append(choice)
        return unfinished

    def apply(self, delta: TextDelta) -> DeltaOutcome:
        """Accept one text delta, dropping text the client already has."""
        found = self._by_id.get(delta.request_id)
        if found is None:
            if delta.request_id in self._recently_closed:
                return DeltaOutcome.LATE
            return DeltaOutcome.UNKNOWN
        if delta.offset < 0 or delta.completion_tokens < 0 or delta.prompt_tokens < 0:
            return DeltaOutcome.INCONSISTENT
        flight, choice = found
        if choice.finished:
            return DeltaOutcome.DUPLICATE
        outcome = DeltaOutcome.ACCEPTED
        end = delta.offset + len(delta.text)
        if delta.offset > choice.delivered_chars:
            outcome = DeltaOutcome.GAP
            new_text = delta.text
        else:
            new_text = delta.text[choice.delivered_chars - delta.offset :]
        # (A replay after a tokenizer failover carries no logprobs.)
        choice.pending_logprobs.extend(delta.logprobs)
        choice.pending_prompt_logprobs.extend(delta.prompt_logprobs)
        if delta.prompt_text is not None and not choice.echo_seen:
            choice.echo, choice.echo_seen = (delta.prompt_text, delta.prompt_first_token), True
        new_calls = choice.accept_tool_calls(delta.tool_calls)
        if new_text:
            choice.pending.append(new_text)
        elif delta.finish_reason is None and end <= choice.delivered_chars and not new_calls:
            outcome = DeltaOutcome.DUPLICATE
        choice.delivered_chars = max(choice.delivered_chars, end)
        # A replay recounts from scratch; counts never go backwards for the client.
        choice.prompt_tokens = max(choice.prompt_tokens, delta.prompt_tokens)
        choice.tokens_arrived(delta.completion_tokens - choice.completion_tokens,
                              time.monotonic())
        choice.completion_tokens = max(choice.completion_tokens, delta.completion_tokens)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
        if outcome is not DeltaOutcome.DUPLICATE:
            flight.last_progress = time.monotonic()
            if flight.has_news():
                flight.notify()
        return outcome

    def fail(self, request_id: str, error: ApiError) -> Flight | None:
        """Fail the whole flight that ``request_id`` (which the mesh has ended)
        belongs to; None for an unknown id. The flight's other choices are left
        for ``close`` to abort."""
        found = self._by_id.get(request_id)
        if found is None:
            return None
        flight, choice = found
        choice.failed = True
        flight.fail(error)
        return flight

    def knows(self, request_id: str) -> bool:
        return request_id in self._by_id or request_id in self._recently_closed

    def held_by(self, holder: bytes) -> list[tuple[Flight, Choice]]:
        """Unfinished requests a tokenizer replica holds (to re-send on its loss)."""
        return [
            (flight, choice)
            for flight, choice in self._by_id.values()
            if choice.holder == holder and choice.live and flight.error is None
        ]

    def outstanding(self) -> Counter[bytes]:
        """Unfinished requests per tokenizer replica."""
        return Counter(
            choice.holder
            for _flight, choice in self._by_id.values()
            if choice.holder is not None and choice.live
        )


def pick_replica(candidates: Sequence[bytes], outstanding: Counter[bytes]) -> bytes | None:
    """The replica with the fewest outstanding requests; ties go to the lowest
    identity so that placement is deterministic."""
    if not candidates:
        return None
    return min(candidates, key=lambda identity: (outstanding[identity], identity))


def group_by_holder(choices: Iterable[Choice]) -> dict[bytes | None, list[str]]:
    """Request ids per tokenizer replica (None: not yet sent to any)."""
    groups: dict[bytes | None, list[str]] = {}
    for choice in choices:
        groups.setdefault(choice.holder, []).append(choice.request_id)
    return groups
