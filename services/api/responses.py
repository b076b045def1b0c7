"""The response objects every route answers with: JSON bodies, OpenAI error bodies,
and ``StreamingBody`` for everything sent while the mesh still produces it (SSE for
text and speech, raw audio for speech)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.api.disconnect import wait_for_disconnect
from services.api.errors import ApiError
from shared.logs import get_logger

log = get_logger("meshserve.api.http")

_json = msgspec.json.Encoder()

SSE_MEDIA_TYPE = "text/event-stream"


def json_response(payload: msgspec.Struct, status: int = 200) -> Response:
    return Response(_json.encode(payload), status_code=status, media_type="application/json")


def error_response(error: ApiError) -> Response:
    return Response(error.encode(), status_code=error.status, media_type="application/json",
                    headers=error.headers())


# Nobody reads it: the client is gone. 499 is what proxies log for "client closed request".
def client_gone_response() -> Response:
    return Response(status_code=499)


class StreamingBody(Response):
    """A 200 whose body is sent piece by piece as ``chunks`` yields it.

    It stops as soon as the client goes away and then always calls
    ``on_close(disconnected)``, even when the client left before the first byte (an
    async generator that never started would not run its own ``finally``). An
    ``ApiError`` out of ``chunks`` after the headers went out ends the connection
    without completing the body (uvicorn closes it), so a client never mistakes a
    cut-off body for a whole one; a stream that can say what failed (SSE) renders the
    error as an event itself instead of raising.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        on_close: Callable[[bool], Awaitable[None]],
        *,
        media_type: str = SSE_MEDIA_TYPE,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no",
                           **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    nonlocal disconnected
                    await wait_for_disconnect(receive)
                    disconnected = True
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                await self._send_body(send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.on_close(disconnected)

    async def _send_body(self, send: Send) -> None:
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except ApiError as error:
            log.warning("stream failed mid-way, connection aborted",
                        status=error.status, code=error.code, message=error.message)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
