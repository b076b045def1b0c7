"""``GET /openapi.json``: a valid OpenAPI 3.1 document (openapi-spec-validator), served by
the real app, listing exactly the routes the app serves, with schemas that are msgspec's
and that real request and response bodies satisfy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
import zmq.asyncio
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.routing import Route

from services.api.app import build_app
from services.api.config import ApiConfig
from services.api.openai_schema import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    HealthReport,
    Usage,
)
from services.api.openapi import OPENAPI_PATH, openapi_document
from services.api.service import ApiActor
from services.api.speech_gateway import SpeechGateway
from services.api.speech_routes import speech_routes
from shared.config import MeshAddresses, ProcessConfig
from shared.mesh import Identity
from shared.service import ServiceRuntime

pytestmark = pytest.mark.anyio


@pytest.fixture
def app(ipc_dir: Path) -> Iterator[Starlette]:
    """The api's app as ``server.main`` assembles it; its actors never run (nothing
    binds), the routes and the document are what is under test."""
    ctx = zmq.asyncio.Context()
    addresses = MeshAddresses(
        api_addr=f"ipc://{ipc_dir}/api.sock", scheduler_addr=f"ipc://{ipc_dir}/sched.sock",
        speech_addr=f"ipc://{ipc_dir}/speech.sock",
    )
    runtime = ServiceRuntime(Identity("api", 0), ProcessConfig(), addresses, ctx)
    config = ApiConfig()
    speech = SpeechGateway(runtime, config)
    try:
        yield build_app(ApiActor(runtime, config), config, "m",
                        extra_routes=speech_routes(speech, config))
    finally:
        ctx.destroy(linger=0)


def test_the_document_is_valid_openapi_3_1() -> None:
    document = openapi_document("1.2.3")
    validate(document)  # raises with the offending path
    assert document["openapi"] == "3.1.0"
    assert document["info"]["version"] == "1.2.3"


def test_body_schemas_are_generated_by_msgspec() -> None:
    document = openapi_document("0")
    _, expected = msgspec.json.schema_components(
        [CompletionRequest, HealthReport], ref_template="#/components/schemas/{name}"
    )
    schemas = document["components"]["schemas"]
    for name, schema in expected.items():
        assert schemas[name] == schema
    post = document["paths"]["/v1/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CompletionRequest"
    }


def _documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, ops in document["paths"].items() for method in ops}


def _served(app: Starlette) -> set[tuple[str, str]]:
    served = set()
    for route in app.routes:
        assert isinstance(route, Route)
        # Starlette's "{model:path}" is OpenAPI's "{model}".
        path = route.path.replace(":path}", "}")
        served.update((path, method) for method in route.methods or () if method != "HEAD")
    return served


def test_every_served_route_is_documented_and_nothing_else(app: Starlette) -> None:
    assert _served(app) == _documented(openapi_document("0"))


async def test_the_app_serves_the_document(app: Starlette) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.get(OPENAPI_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    served = response.json()
    validate(served)
    assert served["paths"].keys() == openapi_document("0")["paths"].keys()


def _schema_of(document: dict[str, Any], ref: dict[str, str]) -> dict[str, Any]:
    """A component schema that resolves its references within ``document``."""
    return {**ref, "components": document["components"]}


def test_real_bodies_satisfy_the_schemas() -> None:
    document = openapi_document("0")
    paths = document["paths"]
    request_ref = paths["/v1/completions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    response_ref = paths["/v1/completions"]["post"]["responses"]["200"]["content"][
        "application/json"]["schema"]
    request_schema = _schema_of(document, request_ref)
    response_schema = _schema_of(document, response_ref)
    jsonschema.validate({"prompt": [1, 2, 3], "max_tokens": 4, "stop": ["\n"]}, request_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"prompt": "hi", "max_tokens": "four"}, request_schema)
    completion = Completion(
        id="cmpl-1", created=1, model="m",
        choices=[CompletionChoice(index=0, text="hi", finish_reason="length")],
        usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
    )
    jsonschema.validate(msgspec.to_builtins(completion), response_schema)
    error_ref = paths["/v1/completions"]["post"]["responses"]["400"]["content"][
        "application/json"]["schema"]
    error = {"error": {"message": "bad", "type": "invalid_request_error", "param": None,
                       "code": None}}
    jsonschema.validate(error, _schema_of(document, error_ref))
