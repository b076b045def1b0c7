"""``GET /openapi.json``: the api's OpenAPI 3.1 document.

Bodies are never written by hand: every request and response schema is generated
from the structs the handlers decode and encode (``openai_schema.py``, the error
body of ``errors.py``) by ``msgspec.json.schema_components``, so the document cannot
drift from what the server accepts. msgspec writes JSON Schema 2020-12, which is
OpenAPI 3.1's schema dialect, so its output goes in as is.

``OPERATIONS`` is the route table the document is built from; a unit test checks it
against the routes the app really serves, so a new route without an entry fails CI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.api.errors import ErrorBody
from services.api.openai_schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    HealthReport,
    ModelCard,
    ModelList,
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechBody,
    SpeechStreamError,
    VoiceList,
)
from services.api.tokenize_routes import (
    DetokenizeBody,
    DetokenizeResponse,
    TokenizeBody,
    TokenizeResponse,
)

OPENAPI_PATH = "/openapi.json"
_REF_TEMPLATE = "#/components/schemas/{name}"
_JSON = "application/json"
_SSE = "text/event-stream"

# Every status a generation or speech request can end with before its body starts
# (services/api/README.md, "Errors"); each carries an OpenAI error body.
_GENERATION_ERRORS = {
    400: "invalid request (bad JSON, a wrong type, an unsupported parameter)",
    404: "unknown model",
    413: "request body too large",
    429: "the mesh is busy",
    503: "no replica to serve it, or shutting down",
    504: "the mesh made no progress in time; the request was aborted",
}


@dataclass(frozen=True)
class Body:
    """One media type of a request or response: a struct (its schema is generated),
    or ``None`` for a body with no JSON schema (audio, Prometheus text)."""

    media_type: str
    struct: Any = None
    # SSE: each ``data:`` line holds one of these, ``data: [DONE]`` ends text streams.
    events: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    operation_id: str
    summary: str
    request: Body | None = None
    ok: tuple[Body, ...] = ()
    ok_status: int = 200
    errors: dict[int, str] = field(default_factory=dict)
    path_params: tuple[str, ...] = ()


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/v1/completions", "post", "createCompletion", "Generate text for a prompt",
        request=Body(_JSON, CompletionRequest),
        ok=(Body(_JSON, Completion), Body(_SSE, events=(Completion,))),
        errors=_GENERATION_ERRORS,
    ),
    Operation(
        "/v1/chat/completions", "post", "createChatCompletion", "Answer a conversation",
        request=Body(_JSON, ChatCompletionRequest),
        ok=(Body(_JSON, ChatCompletion), Body(_SSE, events=(ChatCompletionChunk,))),
        errors=_GENERATION_ERRORS,
    ),
    Operation(
        "/v1/models", "get", "listModels", "The served model",
        ok=(Body(_JSON, ModelList),),
    ),
    Operation(
        "/v1/models/{model}", "get", "retrieveModel", "One model by id",
        ok=(Body(_JSON, ModelCard),), errors={404: "unknown model"}, path_params=("model",),
    ),
    Operation(
        "/v1/audio/speech", "post", "createSpeech", "Synthesize speech",
        request=Body(_JSON, SpeechBody),
        ok=(
            Body("audio/wav"), Body("audio/pcm"),
            Body(_SSE, events=(SpeechAudioDelta, SpeechAudioDone, SpeechStreamError)),
        ),
        errors=_GENERATION_ERRORS,
    ),
    Operation(
        "/tokenize", "post", "tokenize", "A prompt or chat messages as the model's token ids",
        request=Body(_JSON, TokenizeBody), ok=(Body(_JSON, TokenizeResponse),),
        errors={400: "invalid request", 503: "no tokenizer replica"},
    ),
    Operation(
        "/detokenize", "post", "detokenize", "Token ids as text",
        request=Body(_JSON, DetokenizeBody), ok=(Body(_JSON, DetokenizeResponse),),
        errors={400: "invalid request", 503: "no tokenizer replica"},
    ),
    Operation(
        "/v1/audio/voices", "get", "listVoices", "The voices of the connected tts replicas",
        ok=(Body(_JSON, VoiceList),),
    ),
    Operation(
        "/health", "get", "health", "200 when the mesh can serve; 503 names what is missing",
        ok=(Body(_JSON, HealthReport),), errors={503: "not ready"},
    ),
    Operation(
        "/health/ready", "get", "ready",
        "Readiness: 200 when the mesh can serve and the api is not draining; 503 names "
        "what is missing",
        ok=(Body(_JSON, HealthReport),), errors={503: "not ready"},
    ),
    Operation(
        "/health/live", "get", "live", "Liveness: 200 while this process serves HTTP",
        ok=(Body(_JSON),),
    ),
    Operation(
        "/metrics", "get", "metrics", "Prometheus metrics (vLLM's names where one exists)",
        ok=(Body("text/plain"),),
    ),
    Operation(
        OPENAPI_PATH, "get", "openapi", "This document",
        ok=(Body(_JSON),),
    ),
)


def _structs(operations: tuple[Operation, ...]) -> list[Any]:
    """Every struct the operations name, once each, in a stable order."""
    seen: dict[Any, None] = {ErrorBody: None}
    for op in operations:
        bodies = [*op.ok, *([op.request] if op.request else [])]
        for body in bodies:
            for struct in (body.struct, *body.events):
                if struct is not None:
                    seen[struct] = None
    return list(seen)


def _ref(struct: Any) -> dict[str, str]:
    return {"$ref": _REF_TEMPLATE.format(name=struct.__name__)}


def _content(body: Body) -> dict[str, Any]:
    if body.struct is not None:
        return {"schema": _ref(body.struct)}
    if body.events:
        events = " or ".join(f"`{e.__name__}`" for e in body.events)
        return {"schema": {
            "type": "string",
            "description": f"Server-sent events; each `data:` line is a JSON {events}.",
        }}
    if body.media_type == _JSON:
        return {"schema": {"type": "object"}}
    return {"schema": {"type": "string", "format": "binary"}}


def _operation(op: Operation) -> dict[str, Any]:
    error_content = {_JSON: {"schema": _ref(ErrorBody)}}
    responses: dict[str, Any] = {
        str(op.ok_status): {
            "description": "OK",
            "content": {body.media_type: _content(body) for body in op.ok},
        },
    }
    for status, why in sorted(op.errors.items()):
        if status == 503 and op.path in ("/health", "/health/ready"):
            # /health answers 503 with the same report, not an error body.
            responses["503"] = {"description": why, "content": {_JSON: {"schema":
                                                                         _ref(HealthReport)}}}
            continue
        responses[str(status)] = {"description": why, "content": error_content}
    responses["default"] = {"description": "an OpenAI-style error", "content": error_content}
    document: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "responses": responses,
    }
    if op.request is not None:
        document["requestBody"] = {
            "required": True,
            "content": {op.request.media_type: _content(op.request)},
        }
    if op.path_params:
        document["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in op.path_params
        ]
    return document


def openapi_document(
    version: str, operations: tuple[Operation, ...] = OPERATIONS
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations``, schemas generated from their structs."""
    _, components = msgspec.json.schema_components(_structs(operations),
                                                   ref_template=_REF_TEMPLATE)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meshserve",
            "version": version,
            "description": "An OpenAI-compatible API for text and speech, served by an "
                           "actor mesh. Every error is `{\"error\": {message, type, param, "
                           "code}}`.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }


def package_version() -> str:
    try:
        return version("meshserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def openapi_route() -> Route:
    """``GET /openapi.json``; the document is built once, it never changes at run time."""
    encoded = msgspec.json.encode(openapi_document(package_version()))

    async def serve(request: Request) -> Response:
        return Response(encoded, media_type=_JSON)

    return Route(OPENAPI_PATH, serve, methods=["GET"])
