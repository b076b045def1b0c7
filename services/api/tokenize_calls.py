"""``/tokenize`` and ``/detokenize`` calls waiting on a tokenizer replica's answer.

A call is one message out and one back, matched by ``request_id``. No I/O here: the
actor sends and feeds answers in; a handler waits on its ``TokenizeCall``. A replica
that is lost fails the calls it held (503): they are cheap for the client to retry,
unlike a generation, which the actor re-sends.
"""

from __future__ import annotations

import anyio

from services.api.errors import ApiError
from shared.protocol.generation import RequestFailed
from shared.protocol.tokenize import DetokenizeResult, TokenizeResult

Answer = TokenizeResult | DetokenizeResult


class TokenizeCall:
    """One call in flight: its holder and, once answered, its result or error."""

    def __init__(self, request_id: str, holder: bytes) -> None:
        self.request_id = request_id
        self.holder = holder
        self.answer: Answer | None = None
        self.error: ApiError | None = None
        self._done = anyio.Event()

    def resolve(self, answer: Answer) -> None:
        if not self._done.is_set():
            self.answer = answer
            self._done.set()

    def fail(self, error: ApiError) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()

    async def result(self, timeout_s: float) -> Answer:
        """The answer, or its ApiError (504 past ``timeout_s``)."""
        with anyio.move_on_after(timeout_s):
            await self._done.wait()
        if self.error is not None:
            raise self.error
        if self.answer is None:
            raise ApiError(504, f"no answer from the tokenizer in {timeout_s:g}s",
                           code="timeout")
        return self.answer


class TokenizeCalls:
    """Every call in flight by request id."""

    def __init__(self) -> None:
        self._calls: dict[str, TokenizeCall] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def open(self, request_id: str, holder: bytes) -> TokenizeCall:
        assert request_id not in self._calls, request_id  # ids are fresh uuids
        call = TokenizeCall(request_id, holder)
        self._calls[request_id] = call
        return call

    def close(self, call: TokenizeCall) -> None:
        self._calls.pop(call.request_id, None)

    def answer(self, answer: Answer) -> bool:
        """Resolve the call ``answer`` is for; False when no call waits for it."""
        call = self._calls.get(answer.request_id)
        if call is None:
            return False
        call.resolve(answer)
        return True

    def failed(self, failed: RequestFailed) -> bool:
        call = self._calls.get(failed.request_id)
        if call is None:
            return False
        call.fail(ApiError(failed.status, failed.message, code=failed.code))
        return True

    def replica_lost(self, holder: bytes) -> int:
        lost = [call for call in self._calls.values() if call.holder == holder]
        for call in lost:
            call.fail(ApiError(503, "the tokenizer replica answering this call was lost; "
                               "retry", code="no_tokenizer"))
        return len(lost)

    def fail_all(self, error: ApiError) -> None:
        for call in self._calls.values():
            call.fail(error)
