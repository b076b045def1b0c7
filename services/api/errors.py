"""OpenAI-style errors: one exception type that carries the HTTP status and the
``{"error": {"message", "type", "param", "code"}}`` body every failure becomes."""

from __future__ import annotations

import msgspec


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


# Seconds a client should wait before retrying, sent as ``Retry-After`` with every
# 429 (a full queue drains in about a step) and 503 (a restarting replica or a
# draining api: another api behind the same balancer may take the retry at once).
RETRY_AFTER_S = {429: 1, 503: 2}


def error_type_for(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status == 504:
        return "timeout_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class ApiError(Exception):
    """A request ends with this HTTP status and OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        # Anything else is not an error status; a peer that sends one is confused,
        # and the client still deserves an error, not a 200 with an error body.
        self.status = status if 400 <= status <= 599 else 500
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type_for(self.status)
        self.retry_after_s = (
            retry_after_s if retry_after_s is not None else RETRY_AFTER_S.get(self.status)
        )

    def headers(self) -> dict[str, str]:
        """HTTP headers that go with this error (``Retry-After`` on 429 and 503)."""
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(self.retry_after_s)}

    def body(self) -> ErrorBody:
        return ErrorBody(ErrorDetail(self.message, self.type, self.param, self.code))

    def encode(self) -> bytes:
        return msgspec.json.encode(self.body())

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def from_decode_error(error: msgspec.DecodeError | msgspec.ValidationError) -> ApiError:
    """A 400 naming the offending field, from msgspec's "... - at `$.field`" text."""
    text = str(error)
    if isinstance(error, msgspec.ValidationError):
        param = None
        message, sep, where = text.rpartition(" - at `")
        if sep:
            param = where.rstrip("`").removeprefix("$").removeprefix(".") or None
        else:
            message = text
        return bad_request(f"{message}" + (f" (at `{param}`)" if param else ""), param)
    return bad_request(f"request body is not valid JSON: {text}", code="invalid_json")
