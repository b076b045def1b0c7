"""What the socket and HTTP fuzzers found, pinned as regression tests: each input once
crashed a service (or made a 500) and must now be a clean rejection."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from services.api.body import decode_json
from services.api.config import ApiConfig
from services.api.errors import ApiError
from services.api.openai_schema import ChatCompletionRequest
from services.kvcache.block_pool import BlockPoolError
from services.kvcache.manager import MAX_POOL_BLOCKS, KvManager
from shared.config import load_config
from shared.frames import decode_frames
from shared.protocol.common import Hello
from shared.protocol.envelope import PROTOCOL_VERSION, Envelope
from shared.protocol.generation import (
    MAX_CHOICES,
    DetokenizeSpec,
    GenerateRequest,
    SamplingParams,
    Submit,
)
from shared.protocol.kv import KvPoolOpen, KvSetHostSwap

_encode = msgspec.msgpack.encode
_hello = msgspec.msgpack.Decoder(Hello)
GOOD_ENVELOPE = _encode(Envelope(PROTOCOL_VERSION, 1, "fuzz/0"))


@pytest.mark.parametrize("frames", [
    # Invalid UTF-8 in the envelope's sender: msgspec raises UnicodeDecodeError, which
    # once ended the api's receiving task (and the api).
    [b"\x93\x02\x01\xa2\xff\xfe", _encode(Hello("t", 0, "i", PROTOCOL_VERSION, 1))],
    # ... and in a body's string.
    [GOOD_ENVELOPE, b"\x85\xa4type\xa5Hello\xa7service\xa2\xff\xfe\xa7replica\x00"
                    b"\xabincarnation\xa1i\xa8protocol\x02"],
])
def test_undecodable_strings_are_a_rejection(frames: list[bytes]) -> None:
    assert isinstance(decode_frames(frames, _hello), str)


@pytest.mark.parametrize(("body", "why"), [
    (b'{"messages": [{"role": "\xff\xfe"}]}', "UTF-8"),
    (b'{"messages": [], "tools": [{"type": "function", "function": {"name": "f", '
     b'"parameters": {"x": ' + b"[" * 100_000 + b"]", "nested too deeply"),
])
def test_http_bodies_msgspec_cannot_decode_are_a_400(body: bytes, why: str) -> None:
    with pytest.raises(ApiError) as raised:
        decode_json(body, ChatCompletionRequest)
    assert raised.value.status == 400
    assert why in raised.value.message


@pytest.mark.parametrize("num_blocks", [-8979133, 0, MAX_POOL_BLOCKS + 1, 2**63 - 1])
def test_a_pool_of_impossible_size_is_refused(num_blocks: int) -> None:
    # A negative size once raised ValueError out of BlockPool and ended the KV
    # manager; a huge one would allocate without end.
    manager = KvManager()
    with pytest.raises(BlockPoolError, match=r"1\.\.16777216 blocks"):
        manager.open_pool(KvPoolOpen("worker/0", num_blocks, 16, 8))
    assert manager.pools == {}
    assert manager.open_pool(KvPoolOpen("worker/0", 4, 16, 2)).usage.num_blocks == 4


@pytest.mark.parametrize("gb", [float("inf"), float("nan"), -1.0, 1e30])
def test_a_host_swap_size_that_is_not_a_bounded_number_is_refused(gb: float) -> None:
    # host_swap_gb=inf once raised OverflowError out of the resize and ended the KV
    # manager (found by the socket fuzzer once it spoke CURVE).
    manager = KvManager()
    manager.open_pool(KvPoolOpen("worker/0", 4, 16, 2, block_bytes=1000))
    with pytest.raises(BlockPoolError, match="host_swap_gb"):
        manager.set_host_swap(KvSetHostSwap(host_swap_gb=gb))
    _, resizes = manager.set_host_swap(KvSetHostSwap(host_swap_gb=1e-6))
    assert [r.host_num_blocks for r in resizes] == [1]  # 1000 bytes: one block


@pytest.mark.parametrize("message", [
    GenerateRequest("r", SamplingParams(), DetokenizeSpec(), prompt="hi", n=2**31 - 1),
    Submit("r", b"\x01\x00\x00\x00", SamplingParams(), DetokenizeSpec(), n=MAX_CHOICES + 1),
])
def test_a_request_of_unbounded_choices_is_a_rejection(message: Any) -> None:
    """A GenerateRequest claiming n = 2**31 once made the tokenizer build two billion
    choice ids (a stall of minutes, then its memory), before it could refuse it."""
    decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(GenerateRequest | Submit)
    assert isinstance(decode_frames([GOOD_ENVELOPE, _encode(message)], decoder), str)
    within = msgspec.structs.replace(message, n=MAX_CHOICES)
    assert decode_frames([GOOD_ENVELOPE, _encode(within)], decoder)[1] == within


def test_the_api_cannot_offer_more_choices_than_the_wire_carries() -> None:
    with pytest.raises(ValueError, match="max_n"):
        load_config(ApiConfig, environ={"MESHSERVE_MAX_N": str(MAX_CHOICES + 1)})
