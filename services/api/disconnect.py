"""Noticing that an HTTP client went away while we wait on the mesh.

uvicorn does not cancel a handler whose client disconnected; it reports
``http.disconnect`` on the ASGI ``receive`` channel once the body was read. These
helpers watch that channel beside the work and cancel the work at once, so the
request is aborted in the mesh within a round trip of the disconnect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from starlette.types import Receive


@dataclass(slots=True)
class DisconnectWatch:
    disconnected: bool = False


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


@asynccontextmanager
async def cancelled_on_disconnect(receive: Receive) -> AsyncIterator[DisconnectWatch]:
    """Run the body; if the client disconnects first, cancel it and set
    ``watch.disconnected``. Exceptions of the body propagate unwrapped only when
    the body catches its own expected errors: raise nothing expected inside."""
    watch = DisconnectWatch()
    with anyio.CancelScope() as body_scope:
        async with anyio.create_task_group() as tg:

            async def watcher() -> None:
                await wait_for_disconnect(receive)
                watch.disconnected = True
                body_scope.cancel()

            tg.start_soon(watcher)
            yield watch
            tg.cancel_scope.cancel()
