"""The envelope every message travels in, and the packed-array helpers.

A message on any meshserve socket is two frames after the ZMQ routing frames:

    [envelope (msgpack array)] [body (msgpack, a tagged Struct)]

The envelope is decoded first and on its own, so a receiver can always name the
sender of a body it cannot decode and answer it. Bodies are decoded with one typed
decoder per socket family (a tagged union), so an unexpected type is a decode error.

Schema evolution: new fields get defaults and go last; fields are never reordered
or reused. A change that breaks that rule bumps ``PROTOCOL_VERSION``.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable

import msgspec

# 2: the step and KV tables became nested structs (shared/protocol/tables.py).
# 3: a Submit may resume a request after a scheduler restart (``output_token_ids``):
#    a scheduler of version 2 would ignore the field and restart it from scratch.
PROTOCOL_VERSION = 3


class Envelope(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Routing and tracing facts about one message; never about its content."""

    version: int
    msg_id: int
    sender: str  # "service/replica", e.g. "worker/1"
    traceparent: str = ""
    tracestate: str = ""


_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    return _envelope_encoder.encode(envelope)


def decode_envelope(frame: bytes) -> Envelope:
    return _envelope_decoder.decode(frame)


class MessageIds:
    """Message ids unique per process run: a random 32-bit prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = int.from_bytes(os.urandom(4), "little") << 32
        self._counter = 0

    def next(self) -> int:
        self._counter += 1
        return self._prefix | (self._counter & 0xFFFFFFFF)


# Int arrays travel as little-endian int32 bytes: decoding a msgpack list[int] of a
# 256-request step costs ~10x more than unpacking the same ids from bytes.
def pack_i32(values: Iterable[int]) -> bytes:
    packed = values if isinstance(values, array) and values.typecode == "i" else array("i", values)
    return packed.tobytes()


def unpack_i32(data: bytes) -> array[int]:
    unpacked = array("i")
    unpacked.frombytes(data)
    return unpacked


# Chained block hashes are 64-bit.
def pack_i64(values: Iterable[int]) -> bytes:
    return array("q", values).tobytes()


def unpack_i64(data: bytes) -> array[int]:
    unpacked = array("q")
    unpacked.frombytes(data)
    return unpacked
