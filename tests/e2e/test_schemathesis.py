"""schemathesis against the api's own ``/openapi.json`` on a running mesh: every
operation, bodies generated from the document (valid and invalid ones), and not one
answer may be a 5xx (a 4xx with an OpenAI error body is the right answer to a bad
request).

Generation cost is bounded so CI stays fast: the mesh runs with a 64-token context,
and each generated request asks for at most ``MAX_TOKENS`` tokens (speech: at most
``MAX_SPEECH_CHARS`` characters) before it is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.e2e.mesh import Mesh, start_mesh

pytestmark = pytest.mark.slow

MAX_TOKENS = 4
# Declared so that a request relying on one gets a 400 naming it (services/api/README.md);
# dropped from generated bodies so most of them reach the mesh instead.
UNIMPLEMENTED = ("echo", "logprobs", "top_logprobs", "suffix", "best_of", "presence_penalty",
                 "frequency_penalty", "logit_bias", "tools", "tool_choice", "response_format")
MAX_SPEECH_CHARS = 40
EXAMPLES = 25


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(tmp_path_factory.mktemp("schemathesis"),
                         extra_args=("--set", "max_model_len=64"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def api_schema(mesh: Mesh) -> Any:
    return schemathesis.openapi.from_url(mesh.base_url + "/openapi.json", timeout=30)


def bound_cost(body: Any) -> None:
    """Cap what a generated request may cost the mesh, in place."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool):
            body[key] = min(body[key], MAX_TOKENS)
    if "messages" in body and "max_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS  # chat's default is the whole context
    for key in UNIMPLEMENTED:
        body.pop(key, None)
    if isinstance(body.get("input"), str):
        body["input"] = body["input"][:MAX_SPEECH_CHARS]


# schemathesis's pytest plugin does not run under this pytest; its strategies do.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_with_a_server_error(api_schema: Any, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    statuses: list[int] = []
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not len(operation.body):
            # Nothing to get wrong without a body: any string is a valid model id.
            continue

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy(generation_mode=mode))
        def call(case: Any) -> None:
            bound_cost(case.body)
            response = case.call_and_validate(checks=[not_a_server_error], timeout=120)
            statuses.append(response.status_code)

        call()
    # The run reached the mesh, and (positive) generation got past validation.
    assert len(statuses) >= 50, statuses
    if mode is GenerationMode.POSITIVE:
        assert statuses.count(200) >= 5, statuses
