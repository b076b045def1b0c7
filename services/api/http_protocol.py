"""uvicorn's h11 protocol with a bound on the time a request's head may take.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) but puts no
bound on a connection that never finishes its request line and headers: one that
sends nothing after connecting, or trickles a header byte every few seconds
(slowloris), holds its socket and buffer for ever. Here every request head must be
complete within ``header_timeout_s`` of the connection (first request) or of its
first byte (later requests on a keep-alive connection); otherwise the connection is
closed, as nginx's ``client_header_timeout`` does. Bodies are bounded by the app
(``body.read_body``), which can still answer 408.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.logs import get_logger

log = get_logger("meshserve.api.http")


class BoundedH11Protocol(H11Protocol):
    """``H11Protocol`` plus the request-head deadline (``header_timeout_s``)."""

    header_timeout_s: float = 10.0

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # The next request's head has begun but is not complete (uvicorn just
            # cancelled its keep-alive timer): from now on it has a deadline.
            self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        # Between requests the keep-alive timer rules; a new head re-arms ours.
        self._cancel_head_timer()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request head is too slow",
                     client=f"{self.client[0]}:{self.client[1]}" if self.client else None,
                     timeout_s=self.header_timeout_s)
            self.transport.close()


def bounded_h11(header_timeout_s: float) -> type[BoundedH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this deadline
    (uvicorn instantiates the class itself, so the setting rides on a subclass)."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,),
                {"header_timeout_s": header_timeout_s})
