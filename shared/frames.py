"""The two frames of every meshserve message, written and read in one place.

    [envelope (msgpack array)] [body (msgpack, a tagged Struct)]

``FrameWriter`` stamps each outgoing body with an envelope (protocol version, a
fresh message id, the sender, the W3C trace context); ``decode_frames`` reads the
envelope on its own first, so a body that does not decode can still be blamed on,
and answered to, its sender. The mesh endpoints, the supervisor's control socket
and its CLI client all frame through these two.
"""

from __future__ import annotations

from typing import Any

import msgspec
from opentelemetry.context import Context

from shared.protocol.envelope import (
    PROTOCOL_VERSION,
    Envelope,
    MessageIds,
    decode_envelope,
    encode_envelope,
)
from shared.telemetry import inject_context


class FrameWriter:
    """Encodes ``[envelope, body]`` for one sender (``"service/replica"``)."""

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self._ids = MessageIds()
        self._encoder = msgspec.msgpack.Encoder()

    def frames(self, body: Any, ctx: Context | None = None) -> list[bytes]:
        """The frames of one message; ``ctx`` is the trace context it carries
        (None: the current one)."""
        traceparent, tracestate = inject_context(ctx)
        envelope = Envelope(
            version=PROTOCOL_VERSION,
            msg_id=self._ids.next(),
            sender=self.sender,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        return [encode_envelope(envelope), self._encoder.encode(body)]


# What msgspec raises on bytes it cannot decode: its own errors, and for invalid
# UTF-8 in a string or nesting past its depth limit, Python's. A receiver treats
# them all as garbage; none may escape into (and end) its receiving task.
UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def decode_frames(
    frames: list[bytes], decoder: msgspec.msgpack.Decoder[Any]
) -> tuple[Envelope, Any] | str:
    """Decode [envelope, body] with the socket family's typed decoder; a string is
    the reason the message is rejected. The envelope is decoded on its own first,
    so a bad body can still be blamed on (and answered to) its sender."""
    if len(frames) != 2:
        return f"expected 2 frames (envelope, body), got {len(frames)}"
    try:
        envelope = decode_envelope(frames[0])
    except UNDECODABLE as e:
        return f"bad envelope: {e}"
    if envelope.version != PROTOCOL_VERSION:
        return f"protocol version {envelope.version}, this build speaks {PROTOCOL_VERSION}"
    try:
        body = decoder.decode(frames[1])
    except UNDECODABLE as e:
        return f"bad body from {envelope.sender}: {e}"
    return envelope, body
