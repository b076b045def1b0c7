"""How a request with ``n`` > 1 becomes ``n`` choices: the one rule the api, the
tokenizer and the scheduler must agree on.

Choice ``i`` of request ``<id>`` is the request ``<id>-<i>`` everywhere past the
api, and samples with ``seed + i`` when the request is seeded, so the choices
differ from each other and each is reproducible on its own. A request with
``n == 1`` keeps its own id (its single choice is the request).
"""

from __future__ import annotations

import msgspec

from shared.protocol.generation import SamplingParams


def choice_id(request_id: str, index: int) -> str:
    """The id of choice ``index`` of a request with several choices."""
    return f"{request_id}-{index}"


def choice_ids(request_id: str, n: int) -> list[str]:
    """The ids of a request's ``n`` choices: the request's own id when ``n <= 1``."""
    if n <= 1:
        return [request_id]
    return [choice_id(request_id, i) for i in range(n)]


def choice_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of choice ``index``; unseeded stays unseeded."""
    return None if seed is None else seed + index


def choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """The request's sampling parameters as choice ``index`` uses them (its seed)."""
    seed = choice_seed(sampling.seed, index)
    if seed == sampling.seed:
        return sampling
    return msgspec.structs.replace(sampling, seed=seed)
