"""Request bodies: read with a size and a time bound, decode into a typed struct, and
turn every failure into the OpenAI error the client gets (413 too large, 408 too slow,
400 naming the field). Every JSON route (text and speech) reads its body through
``read_json``; the routes that read no body (GETs) leave it to uvicorn, whose flow
control stops reading an unread body past 64 KiB, so it costs no memory."""

from __future__ import annotations

from typing import TypeVar

import anyio
import msgspec
from starlette.requests import Request

from services.api.errors import ApiError, bad_request, from_decode_error
from services.api.openai_schema import decode_body

T = TypeVar("T")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The raw body, refused (413) past ``max_bytes`` before it is all in memory, and
    (408) when it has not all arrived within ``timeout_s``: a client trickling a
    body must not hold a connection and its buffer for ever."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks = []
    size = 0
    with anyio.move_on_after(timeout_s) as deadline:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    if deadline.cancelled_caught:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout")
    return b"".join(chunks)


def decode_json(raw: bytes, kind: type[T]) -> T:
    """``raw`` decoded as ``kind``; a 400 naming the offending field otherwise."""
    try:
        return decode_body(raw, kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise from_decode_error(e) from e
    # msgspec raises Python's own errors for these two; they are the client's too.
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise bad_request("request body is nested too deeply", code="invalid_json") from e


async def read_json(request: Request, kind: type[T], max_bytes: int, timeout_s: float) -> T:
    return decode_json(await read_body(request, max_bytes, timeout_s), kind)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {max_bytes} bytes",
                    code="request_too_large")
