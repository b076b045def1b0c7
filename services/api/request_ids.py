"""``X-Request-Id``: the client's id for its request, or one made here; echoed in
every response's headers (errors included), as vLLM does.

A given id names the request in the mesh (``cmpl-<id>``, ``chatcmpl-<id>``: the
response's ``id`` too), so two requests in flight may not share one: the second
gets a 400. Ids are printable ASCII without spaces, at most ``MAX_REQUEST_ID_CHARS``.
"""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import ApiError
from services.api.responses import error_response

HEADER = b"x-request-id"
MAX_REQUEST_ID_CHARS = 256


def request_id_of(scope: Scope) -> str:
    """The id ``RequestIds`` chose for this request (in the ASGI scope's state); a
    fresh one where the middleware did not run."""
    rid = scope.get("state", {}).get("request_id")
    return rid if isinstance(rid, str) else uuid.uuid4().hex


def _valid(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID_CHARS and all(33 <= ord(c) < 127 for c in value)


class RequestIds:
    """ASGI middleware: picks each HTTP request's id and echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope["headers"] if k == HEADER), None)
        given = raw.decode("latin-1").strip() if raw is not None else None
        rid = given if given is not None and _valid(given) else uuid.uuid4().hex
        header = (HEADER, rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        refusal = None
        if given is not None and not _valid(given):
            refusal = ApiError(400, "X-Request-Id must be 1 to "
                               f"{MAX_REQUEST_ID_CHARS} printable ASCII characters, no spaces",
                               code="invalid_request_error", param="X-Request-Id")
        elif rid in self.in_flight:
            refusal = ApiError(400, f"X-Request-Id {rid!r} is already in use by a request "
                               "in flight; request ids must be unique",
                               code="invalid_request_error", param="X-Request-Id")
        if refusal is not None:
            await error_response(refusal)(scope, receive, send_with_id)
            return
        scope.setdefault("state", {})["request_id"] = rid
        self.in_flight.add(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.in_flight.discard(rid)
