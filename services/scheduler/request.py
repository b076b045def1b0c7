"""A request as the scheduler sees it: its tokens, where it runs, how far it got.

Token accounting while steps are in flight (the scheduler plans step N+1 before the
tokens of step N come back):

    token_ids      prompt + outputs the scheduler has *seen* (from step results)
    prefill_ids    what the worker was given at admission (prompt, plus outputs
                   after a recompute preemption)
    num_scheduled  positions the worker has been told to compute, in total
    num_sampling   samples scheduled but not yet seen

A request needs one sample per step once its prefill is scheduled, so it can run
a decode in step N+1 before step N's token is known: the worker feeds the
request's own last sampled token.
"""

from __future__ import annotations

import enum
import time
from array import array
from dataclasses import dataclass, field

from opentelemetry.context import Context
from opentelemetry.trace import Span

from shared.protocol.generation import DetokenizeSpec, SamplingParams
from shared.protocol.logprobs import Logprobs


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTING = 2  # chosen as a victim; waits for its in-flight steps to drain
    # Preempted by swap: its K/V sit in host blocks of its worker, which keeps its
    # state; it waits in the queue to be swapped back in there.
    SWAPPED = 3
    # Handed off (handoff.py): its K/V travel from its prefill worker to a decode
    # worker; it runs on neither until the transfer settles.
    TRANSFERRING = 4
    # Everything from here on is terminal ("finished").
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_len: int
    token_ids: array[int]  # prompt then outputs seen so far
    sampling: SamplingParams
    detokenize: DetokenizeSpec
    priority: int
    arrival: int  # admission order; FCFS within a priority
    owner: str  # the tokenizer replica that detokenizes this request
    eos_token_ids: frozenset[int] = frozenset()
    max_total_len: int = 0  # prompt + outputs may not exceed this (model length)
    status: RequestStatus = RequestStatus.WAITING
    worker: str | None = None
    prefill_ids: array[int] = field(default_factory=lambda: array("i"))
    num_scheduled: int = 0
    num_sampling: int = 0
    inflight_steps: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of token_ids' full blocks computed so far (prefix caching);
    # they depend on tokens only, so they survive a preemption.
    block_hashes: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0  # of block_ids, indexed in the prefix cache
    sent_to_worker: bool = False
    num_preemptions: int = 0
    arrived_at: float = field(default_factory=time.monotonic)
    first_scheduled_at: float | None = None
    context: Context | None = None
    span: Span | None = None
    salt: str = ""  # cache salt: the root of the request's block hashes
    # n > 1 (copy-on-write forks): the choices other than the one that computes the
    # prompt wait in ``pending_forks`` of that leader, outside the waiting queue,
    # until its prompt is scheduled; then they take over its block table.
    group: str | None = None  # the Submit's request id, for a fork
    pending_forks: list[Request] = field(default_factory=list)
    fork_pending: bool = False  # waits in a leader's pending_forks
    table_sent: bool = True  # the worker has the block table (a new fork: not yet)
    host_blocks: list[int] = field(default_factory=list)  # swapped out: its table on host
    # Prompt logprobs of the chunks computed so far; they go with the first output.
    prompt_logprobs: list[Logprobs] = field(default_factory=list)
    # Admitted on a prefill worker (roles.py): once its prompt is computed and its
    # first token sampled it goes to a decode worker instead of decoding here.
    hands_off: bool = False
    handoff_failed: bool = False  # a hand-off of it failed: it decodes where it runs

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def prefill_done(self) -> bool:
        return self.num_scheduled >= len(self.prefill_ids)

    @property
    def samples_promised(self) -> int:
        """Outputs there will be once every scheduled step has come back."""
        return self.num_outputs + self.num_sampling

    def can_decode(self) -> bool:
        """Another sample may be scheduled without overshooting a known limit."""
        if self.hands_off:
            return False  # its decode runs on the worker it is handed to
        promised = self.samples_promised
        return (
            promised < self.sampling.max_tokens
            and self.prompt_len + promised < self.max_total_len
        )

    def finish_reason_after(self, token: int) -> RequestStatus | None:
        """Whether the output just appended (``token``) ends this request."""
        outputs = self.num_outputs
        if outputs >= self.sampling.min_tokens and (
            token in self.sampling.stop_token_ids
            or (not self.sampling.ignore_eos and token in self.eos_token_ids)
        ):
            return RequestStatus.FINISHED_STOPPED
        if outputs >= self.sampling.max_tokens or len(self.token_ids) >= self.max_total_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def reset_for_recompute(self) -> None:
        """Back to waiting; its next admission prefills prompt and outputs again."""
        self.status = RequestStatus.WAITING
        self.worker = None
        self.prefill_ids = array("i")
        self.num_scheduled = 0
        self.num_sampling = 0
        self.inflight_steps = 0
        self.block_ids = []
        self.num_committed_blocks = 0
        self.sent_to_worker = False
        self.table_sent = True
        self.host_blocks = []
        self.num_preemptions += 1
        if self.num_outputs == 0:
            self.prompt_logprobs = []  # the worker computes the whole prompt again

