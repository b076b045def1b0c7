"""Request bodies: read with a size bound, decode into a typed struct, and turn every
failure into the OpenAI error the client gets (413 too large, 400 naming the field).
Every JSON route (text and speech) reads its body through ``read_json``."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from starlette.requests import Request

from services.api.errors import ApiError, bad_request, from_decode_error
from services.api.openai_schema import decode_body

T = TypeVar("T")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused (413) past ``max_bytes`` before it is all in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
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


async def read_json(request: Request, kind: type[T], max_bytes: int) -> T:
    return decode_json(await read_body(request, max_bytes), kind)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {max_bytes} bytes",
                    code="request_too_large")
