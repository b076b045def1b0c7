"""Which tokenizer replica detokenizes each request, when replicas come and go.
Pure: functions over the scheduler's live requests."""

from __future__ import annotations

from collections.abc import Mapping

from services.scheduler.request import Request


def adopt_orphans(requests: Mapping[str, Request], owner: str) -> list[Request]:
    """Tokenizer ``owner`` joined: it takes over the requests whose tokenizer
    died while no other replica was up. Returns them (it needs their state)."""
    orphans = [r for r in requests.values() if r.owner == ""]
    for request in orphans:
        request.owner = owner
    return orphans


def reassign(requests: Mapping[str, Request], lost: str, successors: list[str]) -> list[Request]:
    """Tokenizer ``lost`` died: its requests go round-robin to ``successors``
    (orphans, owned by "", when there is none). Returns the reassigned ones."""
    orphans = [r for r in requests.values() if r.owner == lost]
    for index, request in enumerate(orphans):
        request.owner = successors[index % len(successors)] if successors else ""
    return orphans if successors else []
