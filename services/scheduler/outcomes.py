"""What the scheduler core hands back to its actor: outputs for the tokenizers,
failures, and what a Submit did. Plain values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.request import Request
from shared.protocol.generation import RequestFailed
from shared.protocol.logprobs import Logprobs


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """New output ids of one request, for its tokenizer."""

    request: Request
    token_ids: list[int]
    num_prior: int
    finish_reason: str | None
    logprobs: list[Logprobs] = field(default_factory=list)
    prompt_logprobs: list[Logprobs] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RequestFailure:
    owner: str
    failure: RequestFailed


@dataclass(frozen=True, slots=True)
class Takeover:
    """A re-sent Submit moved a request to another tokenizer replica."""

    request: Request
    previous_owner: str


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What one Submit did. A first Submit queues its requests (``queued``: one, or
    its n choices; empty when it was refused or aborted already). A re-sent one
    (after a tokenizer failover) changes only who detokenizes: ``takeovers`` name
    the live requests the sender now owns (it needs each one's state), ``ended``
    the choices of an n > 1 request that will get no more outputs (the sender must
    not keep state for them)."""

    queued: list[Request] = field(default_factory=list)
    takeovers: list[Takeover] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
