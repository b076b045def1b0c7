"""API keys on HTTP: ``Authorization: Bearer <key>``, as OpenAI's and vLLM's.

With keys configured (``--api-key``, ``MESHSERVE_API_KEY``, comma-separated) every
route needs one of them, speech included, except the probes and the scrape
(``/health``, ``/health/*``, ``/metrics``) and the API's own description
(``/openapi.json``: it holds no data, and vLLM leaves it open too). Without keys
the API is open, as vLLM's is. A missing or wrong key is a 401 with OpenAI's body
(``invalid_request_error`` / ``invalid_api_key``) and ``WWW-Authenticate: Bearer``.

The guard is plain ASGI around the whole app, so no route can forget it.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from services.api.errors import ApiError
from services.api.responses import error_response
from shared.mesh import RejectionLog

OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})
OPEN_PREFIXES = ("/health/",)
MISSING = ("You didn't provide an API key. You need to provide your API key in an "
           "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
INCORRECT = "Incorrect API key provided."


def parse_api_keys(setting: str) -> tuple[bytes, ...]:
    """``MESHSERVE_API_KEY``'s value: keys separated by commas; blanks are dropped."""
    return tuple(key.strip().encode() for key in setting.split(",") if key.strip())


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def bearer_token(authorization: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


class ApiKeyCheck:
    """Pure: does a presented token match one of the configured keys?"""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def accepts(self, token: bytes) -> bool:
        # Compared with every key in constant time, without stopping at a match, so
        # the answer's timing says neither which key matched nor how much of one.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        return matched

    def refusal(self, token: bytes | None) -> ApiError | None:
        """The 401 for ``token`` (None: no Authorization header), or None if it passes."""
        if token is not None and self.accepts(token):
            return None
        return ApiError(401, MISSING if token is None else INCORRECT,
                        code="invalid_api_key", type="invalid_request_error")


class ApiKeyGuard:
    """ASGI middleware: answers 401 before ``app`` sees a request without a key."""

    def __init__(self, app: ASGIApp, check: ApiKeyCheck) -> None:
        self.app = app
        self.check = check
        # Counted (`meshserve:api_auth_failures_total`) and logged at most once per
        # client per 10 s, so a misconfigured client cannot flood the log.
        self.refusals = RejectionLog("api http", event="request without a valid api key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.check.enabled or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        error = self.check.refusal(bearer_token(Headers(scope=scope).get("authorization")))
        if error is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        self.refusals.record(client[0] if client else "unknown client",
                             f"{error.message} ({scope['path']})")
        response = error_response(error)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
