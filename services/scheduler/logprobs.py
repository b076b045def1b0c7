"""Where a step's logprobs go: prompt rows wait on their request until its first
output (the whole prompt is computed by then); a sampled token's row travels with
that token. Pure."""

from __future__ import annotations

from collections.abc import Mapping

from services.scheduler.request import Request
from shared.protocol.step import StepResult


def hold_prompt_logprobs(requests: Mapping[str, Request], result: StepResult) -> None:
    """Keep the step's prompt rows on their requests (ended ones drop theirs)."""
    for request_id, rows in result.prompt_logprobs:
        request = requests.get(request_id)
        if request is not None:
            request.prompt_logprobs.append(rows)
