"""Worker roles: which part of a request a worker is given. Pure.

A worker says its role in its hello (``WorkerDetails.role``, from the supervisor's
``--worker-roles``): ``prefill`` workers take new requests and compute their prompts,
then hand each one off to a ``decode`` worker (handoff.py); ``both`` (the default)
does the whole request. New requests are placed only on ``prefill``/``both``
workers, and hand-offs go only to ``decode``/``both`` ones; when no worker of the
wanted kind is up, any worker will do (a mesh keeps serving while one role is down).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # worker_slot asks hands_off at admission
    from services.scheduler.request import Request
    from services.scheduler.worker_slot import WorkerSlot

ROLES = ("prefill", "decode", "both")


def takes_new(slot: WorkerSlot) -> bool:
    return slot.details.role != "decode"


def decodes(slot: WorkerSlot) -> bool:
    return slot.details.role != "prefill"


def admitting(slots: Iterable[WorkerSlot]) -> list[WorkerSlot]:
    """The workers new requests may be placed on: prefill and both ones, or every
    worker while none of those is up."""
    slots = list(slots)
    return [s for s in slots if takes_new(s)] or slots


def hands_off(slot: WorkerSlot, request: Request) -> bool:
    """Whether ``request``, admitted on ``slot``, goes to a decode worker once its
    prompt is computed and its first token sampled. Not: n > 1 choices (they share
    their leader's blocks copy-on-write on this worker), requests asking for prompt
    logprobs (rare, and they read nothing cached either), and a request whose hand-off
    failed once (it is recomputed and decodes where it is, so a broken peer cannot
    bounce it for ever)."""
    return (slot.details.role == "prefill" and bool(slot.details.transfer_addr)
            and request.group is None and request.sampling.prompt_logprobs < 0
            and not request.handoff_failed)
