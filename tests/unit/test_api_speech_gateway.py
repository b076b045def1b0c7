"""The api's SpeechGateway over real ipc sockets, with the test speaking for tts replicas (real
DealerEndpoints): routing by load, busy re-routing, failover without repeated audio,
cancellation, strays, and the request body and WAV header helpers."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import msgspec
import pytest
import zmq.asyncio
from opentelemetry.context import Context

from services.api.audio import wav_header
from services.api.body import decode_json
from services.api.config import ApiConfig
from services.api.errors import ApiError
from services.api.openai_schema import SpeechBody
from services.api.speech_flight import SpeechFlight
from services.api.speech_gateway import SpeechGateway
from services.api.speech_plan import check_speech_body
from shared.config import MeshAddresses, ProcessConfig
from shared.mesh import DealerEndpoint, Identity, Received
from shared.protocol.speech import (
    SpeechCancel,
    SpeechCatalog,
    SpeechCatalogRequest,
    SpeechChunk,
    SpeechFailed,
    SpeechRequest,
    SpeechToTts,
    SpeechVoice,
)
from shared.service import ServiceRuntime

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 0.05
T = TypeVar("T")
CATALOG = SpeechCatalog("espeak-ng", 22050, ["espeak-ng", "tts-1"],
                        [SpeechVoice("alloy", "en-us"), SpeechVoice("nova", "en-us")])


@dataclass
class Replica:
    """The test speaking for one tts replica."""

    dealer: DealerEndpoint[SpeechToTts]
    received: list[SpeechToTts] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def serve(self) -> None:
        async for event in self.dealer.inbox:
            if isinstance(event, Received):
                if isinstance(event.body, SpeechCatalogRequest):
                    await self.dealer.send(CATALOG)
                self.received.append(event.body)
                self.changed.set()
                self.changed = anyio.Event()

    async def until(self, condition: Callable[[], object], timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                await self.changed.wait()

    def of(self, kind: type[T]) -> list[T]:
        return [m for m in self.received if isinstance(m, kind)]

    async def wait_for(self, kind: type[T], count: int = 1) -> T:
        await self.until(lambda: len(self.of(kind)) >= count)
        return self.of(kind)[count - 1]

    def requests(self) -> list[str]:
        return [m.request_id for m in self.received if isinstance(m, SpeechRequest)]

    async def chunk(self, request_id: str, seq: int, samples: int, offset: int,
                    final: bool = False, value: int = 1) -> None:
        pcm = struct.pack("<h", value) * samples
        await self.dealer.send(SpeechChunk(request_id, seq, pcm, 24000, final, offset))


def api_runtime(ctx: zmq.asyncio.Context, speech_addr: str) -> ServiceRuntime:
    """The api process's runtime, as far as the gateway reads it."""
    return ServiceRuntime(Identity("api", 0), ProcessConfig(heartbeat_s=HEARTBEAT_S),
                          MeshAddresses(speech_addr=speech_addr), ctx)


@asynccontextmanager
async def mesh(ipc_dir: Path, capacities: list[int], **config: int) -> AsyncIterator[
    tuple[SpeechGateway, list[Replica]]
]:
    ctx = zmq.asyncio.Context()
    address = f"ipc://{ipc_dir}/speech.sock"
    gateway = SpeechGateway(api_runtime(ctx, address), ApiConfig(**config),
                            status_interval_s=3600)
    replicas = []
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.run)
            for index, capacity in enumerate(capacities):
                identity = Identity("tts", index)
                dealer: DealerEndpoint[SpeechToTts] = DealerEndpoint(
                    ctx, address, identity, SpeechToTts, heartbeat_s=HEARTBEAT_S,
                    hello=lambda i=identity, c=capacity: i.hello(ready=True, capacity=c),
                )
                replica = Replica(dealer)
                replicas.append(replica)
                await tg.start(dealer.run)
                tg.start_soon(replica.serve)
            with anyio.fail_after(5):
                await gateway.wait_for_replicas(len(capacities))
            yield gateway, replicas
            tg.cancel_scope.cancel()
    finally:
        for replica in replicas:
            replica.dealer.close()
        ctx.destroy(linger=0)


def request(request_id: str, voice: str = "alloy", model: str = "tts-1") -> SpeechRequest:
    return SpeechRequest(request_id, "Hello there.", voice, sample_rate=24000, model=model)


async def drain(flight: SpeechFlight) -> bytes:
    out = b""
    with anyio.fail_after(5):
        while (pcm := await flight.next()) is not None:
            out += pcm
    return out


async def test_requests_go_to_the_least_loaded_replica_per_engine(ipc_dir: Path) -> None:
    async with mesh(ipc_dir, [2, 1]) as (gateway, (big, small)):
        flights = [await gateway.open(request(rid), Context()) for rid in ("a", "b", "c")]
        await big.wait_for(SpeechRequest, 2)
        await small.wait_for(SpeechRequest, 1)
        # a: tie, by name -> tts/0; b: tts/1 is idle; c: tts/0 at 1/2 beats tts/1 at 1/1.
        assert big.requests() == ["a", "c"] and small.requests() == ["b"]
        for flight in flights:
            await gateway.close(flight)


async def test_busy_replicas_are_skipped_until_none_is_left(ipc_dir: Path) -> None:
    async with mesh(ipc_dir, [1, 1]) as (gateway, (first, second)):
        flight = await gateway.open(request("r"), Context())
        await first.wait_for(SpeechRequest)
        await first.dealer.send(SpeechFailed("r", 429, "server_busy", "full"))
        await second.wait_for(SpeechRequest)
        assert second.requests() == ["r"]
        await second.dealer.send(SpeechFailed("r", 429, "server_busy", "full"))
        with pytest.raises(ApiError) as caught, anyio.fail_after(5):
            await flight.next()
        assert (caught.value.status, caught.value.code) == (429, "server_busy")
        await gateway.close(flight)
        assert gateway.metrics.requests == {"error": 1}


async def test_a_lost_replica_hands_over_and_audio_is_not_repeated(ipc_dir: Path) -> None:
    async with mesh(ipc_dir, [1, 1]) as (gateway, (first, second)):
        flight = await gateway.open(request("r"), Context())
        await first.wait_for(SpeechRequest)
        await first.chunk("r", 0, 100, 0, value=1)
        await first.chunk("r", 1, 100, 100, value=2)
        with anyio.fail_after(5):
            assert await flight.next() == struct.pack("<h", 1) * 100
            assert await flight.next() == struct.pack("<h", 2) * 100
        first.dealer.close()  # it stops beating: lost after three beats
        await second.wait_for(SpeechRequest)
        # The replay starts from sample 0; only what the client lacks goes through.
        await second.chunk("r", 0, 150, 0, value=3)
        await second.chunk("r", 1, 100, 150, final=True, value=4)
        assert await drain(flight) == struct.pack("<h", 4) * 50
        assert flight.samples == 250 and flight.done
        await gateway.close(flight)
        assert gateway.metrics.requests == {"ok": 1}


async def test_failures_reach_the_handler_and_strays_are_cancelled(ipc_dir: Path) -> None:
    async with mesh(ipc_dir, [1]) as (gateway, (replica,)):
        flight = await gateway.open(request("r"), Context())
        await replica.wait_for(SpeechRequest)
        await replica.dealer.send(SpeechFailed("r", 500, "engine_error", "boom"))
        with pytest.raises(ApiError, match="boom"), anyio.fail_after(5):
            await flight.next()
        await gateway.close(flight)
        # Audio for a request the api does not have: the replica is told to stop.
        await replica.chunk("ghost", 0, 10, 0)
        cancel = await replica.wait_for(SpeechCancel)
        assert cancel.request_ids == ["ghost"]


async def test_closing_an_unfinished_flight_cancels_it_at_its_replica(ipc_dir: Path) -> None:
    async with mesh(ipc_dir, [1]) as (gateway, (replica,)):
        flight = await gateway.open(request("r"), Context())
        await replica.wait_for(SpeechRequest)
        await gateway.close(flight)
        await gateway.close(flight)  # idempotent
        cancel = await replica.wait_for(SpeechCancel)
        assert cancel.request_ids == ["r"]
        assert gateway.metrics.requests == {"cancelled": 1} and gateway.metrics.running == 0
        assert 'outcome="cancelled"} 1' in gateway.render_metrics()


async def test_a_client_that_reads_too_slowly_is_cut_off(ipc_dir: Path) -> None:
    async with mesh(ipc_dir, [1], speech_max_buffered_bytes=1000) as (gateway, (replica,)):
        flight = await gateway.open(request("r"), Context())
        await replica.wait_for(SpeechRequest)
        for seq in range(3):
            await replica.chunk("r", seq, 300, seq * 300)
        # A stray is answered in order, after the chunks before it were taken.
        await replica.chunk("ghost", 0, 1, 0)
        await replica.wait_for(SpeechCancel)
        with pytest.raises(ApiError) as caught:
            await flight.next()
        assert caught.value.code == "client_too_slow"
        await gateway.close(flight)


async def test_requests_no_replica_can_serve_are_refused_up_front(ipc_dir: Path) -> None:
    async with mesh(ipc_dir, [1]) as (gateway, _):
        with pytest.raises(ApiError) as caught:
            await gateway.open(request("v", voice="nope"), Context())
        assert (caught.value.status, caught.value.param) == (400, "voice")
        with pytest.raises(ApiError) as caught:
            await gateway.open(request("m", model="nope"), Context())
        assert (caught.value.status, caught.value.code) == (404, "model_not_found")
    ctx = zmq.asyncio.Context()
    lonely = SpeechGateway(api_runtime(ctx, f"ipc://{ipc_dir}/other.sock"), ApiConfig())
    with pytest.raises(ApiError) as caught:
        await lonely.open(request("x"), Context())
    assert caught.value.status == 503
    lonely.router.close()
    ctx.destroy(linger=0)


def parse_speech_body(raw: bytes) -> SpeechBody:
    """What the speech route does with a body it read."""
    return check_speech_body(decode_json(raw, SpeechBody))


def test_request_bodies_are_validated_like_openai() -> None:
    body = parse_speech_body(b'{"model": "tts-1", "input": "Hi.", "voice": {"id": "nova"}}')
    assert body.voice.id == "nova" and body.response_format == "mp3"  # type: ignore[union-attr]
    assert body.sample_rate == 24000 and body.stream and body.stream_format == "audio"
    bad = {
        b'{"model": "tts-1", "input": "  ", "voice": "alloy"}': "input",
        b'{"model": "tts-1", "input": "x", "voice": "alloy", "response_format": "wma"}':
            "response_format",
        # opus encodes 8, 12, 16, 24 and 48 kHz only
        b'{"model": "tts-1", "input": "x", "voice": "alloy", "response_format": "opus", '
        b'"sample_rate": 44100}': "sample_rate",
        b'{"model": "tts-1", "input": "x", "voice": "alloy", "sample_rate": 4000}':
            "sample_rate",
        b'{"model": "tts-1", "input": "x", "voice": "alloy", "speed": 0.1}': "speed",
        b'{"model": "tts-1", "input": "x", "voice": "alloy", "stream_format": "ws"}':
            "stream_format",
        b'{"model": "tts-1", "input": 3, "voice": "alloy"}': "input",
        b'{"input": "x", "voice": "alloy"}': None,
        b"not json": None,
    }
    for raw, param in bad.items():
        with pytest.raises(ApiError) as caught:
            parse_speech_body(raw)
        assert caught.value.status == 400 and caught.value.param == param, raw
        error = msgspec.json.decode(caught.value.encode())["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    for response_format in ("mp3", "opus", "aac", "flac", "wav", "pcm"):
        raw = (b'{"model": "tts-1", "input": "x", "voice": "alloy", "response_format": "%s"}'
               % response_format.encode())
        assert parse_speech_body(raw).response_format == response_format


def test_wav_headers_for_streams_and_whole_files() -> None:
    streamed = wav_header(24000, None)
    assert len(streamed) == 44 and streamed[4:8] == b"\xff" * 4 and streamed[40:] == b"\xff" * 4
    whole = wav_header(22050, 1000)
    riff, fmt, channels, rate, byte_rate, align, bits, data = (
        struct.unpack_from("<I", whole, 4)[0], struct.unpack_from("<H", whole, 20)[0],
        *struct.unpack_from("<HIIHH", whole, 22), struct.unpack_from("<I", whole, 40)[0],
    )
    assert (riff, fmt, channels, rate, byte_rate, align, bits, data) == (
        36 + 2000, 1, 1, 22050, 44100, 2, 16, 2000,
    )
