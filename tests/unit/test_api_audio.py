"""Speech response formats: every OpenAI format encodes (PyAV) and decodes back to the
duration it was given, streamed piece by piece and as a whole file; the codecs run
off the event loop."""

from __future__ import annotations

import io

import anyio
import av
import numpy as np
import pytest

from services.api.audio import (
    FORMATS,
    RESPONSE_FORMATS,
    StreamEncoder,
    raw_stream,
    wav_header,
)
from services.api.audio_codec import CodecStream, EncodingError, codec_whole_file
from services.api.errors import ApiError
from services.api.speech_encoding import SpeechEncoding

RATE = 24000
# How many samples longer than its input a decoded file may be: mp3 and aac cannot
# always say how much encoder delay and padding to trim (measured at 24 kHz: mp3 1344
# samples, aac 1664; under two codec frames of 1152 / 1024 samples).
SLACK_SAMPLES = {"mp3": 2 * 1152, "aac": 2 * 1024}


def speech_like(seconds: float, rate: int = RATE) -> bytes:
    """A voiced tone with a wobble: compressible like speech, not silence."""
    t = np.arange(int(seconds * rate)) / rate
    wave = np.sin(2 * np.pi * 180 * t + 3 * np.sin(2 * np.pi * 4 * t)) * 9000
    return wave.astype("<i2").tobytes()


def decoded(data: bytes) -> tuple[int, np.ndarray]:
    """(sample rate, mono samples) of a file, decoded by PyAV (ffmpeg)."""
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(container.streams.audio[0]))
    rate = frames[0].sample_rate
    return rate, np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


def decoded_seconds(response_format: str, data: bytes, rate: int = RATE) -> float:
    if response_format == "pcm":
        return len(data) / 2 / rate
    decoded_rate, samples = decoded(data)
    return len(samples) / decoded_rate


def assert_duration(response_format: str, data: bytes, seconds: float, rate: int = RATE) -> None:
    got = decoded_seconds(response_format, data, rate)
    slack = SLACK_SAMPLES.get(response_format, 0) / rate
    assert seconds - 0.001 <= got <= seconds + slack + 0.001, (response_format, got, seconds)


def stream_encoder(response_format: str, rate: int = RATE) -> StreamEncoder:
    audio_format = FORMATS[response_format]
    if audio_format.uses_codec:
        return CodecStream(audio_format, rate)
    return raw_stream(audio_format, rate)


@pytest.mark.parametrize("response_format", RESPONSE_FORMATS)
def test_every_format_streams_and_decodes_to_its_duration(response_format: str) -> None:
    pcm = speech_like(2.0)
    encoder = stream_encoder(response_format)
    pieces = [encoder.encode(pcm[i:i + 4801]) for i in range(0, len(pcm), 4801)]  # odd cuts
    pieces.append(encoder.finish())
    encoder.close()
    # Streamed: bytes come out long before the end, not all at finish.
    assert sum(map(len, pieces[:10])) > 0, [len(p) for p in pieces]
    assert_duration(response_format, b"".join(pieces), 2.0)


@pytest.mark.parametrize("response_format", RESPONSE_FORMATS)
def test_every_format_as_a_whole_file_decodes_to_its_duration(response_format: str) -> None:
    pcm = speech_like(1.5)
    data = anyio.run(SpeechEncoding(threads=1).whole_file, response_format, RATE, pcm)
    if response_format in ("mp3", "flac", "opus", "wav"):
        # Seekable output: the LAME tag / STREAMINFO / granules make it exact.
        assert decoded_seconds(response_format, data) == 1.5
    assert_duration(response_format, data, 1.5)


def test_decoded_audio_sounds_like_the_input() -> None:
    pcm = speech_like(1.0)
    source = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768
    for response_format in ("mp3", "opus", "aac", "flac"):
        rate, samples = decoded(codec_whole_file(FORMATS[response_format], RATE, pcm))
        scale = 32768 if samples.dtype.kind == "i" else 1  # flac decodes to s16, others float
        samples = samples.astype(np.float64) / scale
        # Same loudness (within 1 dB): the codec kept the signal, not noise or silence.
        rms_in, rms_out = np.sqrt(np.mean(source**2)), np.sqrt(np.mean(samples**2))
        assert abs(20 * np.log10(rms_out / rms_in)) < 1.0, (response_format, rate)
    flac = codec_whole_file(FORMATS["flac"], RATE, pcm)
    assert np.array_equal(decoded(flac)[1], np.frombuffer(pcm, dtype="<i2"))  # lossless


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_other_rates_keep_their_duration(rate: int) -> None:
    for response_format in ("mp3", "opus", "aac", "flac"):
        data = codec_whole_file(FORMATS[response_format], rate, speech_like(1.0, rate))
        assert_duration(response_format, data, 1.0, rate)


def test_a_rate_the_codec_lacks_is_refused_before_encoding() -> None:
    assert FORMATS["opus"].sample_rate_problem(44100) is not None
    assert FORMATS["mp3"].sample_rate_problem(44100) is None
    assert FORMATS["flac"].sample_rate_problem(44000) is None
    with pytest.raises(EncodingError, match="sample_rate"):
        CodecStream(FORMATS["opus"], 44100)


def test_streamed_wav_has_the_unknown_size_header_once() -> None:
    stream = raw_stream(FORMATS["wav"], RATE)
    assert stream.encode(b"\x01\x00") == wav_header(RATE, None) + b"\x01\x00"
    assert stream.encode(b"\x02\x00") == b"\x02\x00"
    assert stream.finish() == b""
    empty = raw_stream(FORMATS["wav"], RATE)
    assert empty.finish() == wav_header(RATE, None)  # no audio: still a header
    assert raw_stream(FORMATS["pcm"], RATE).encode(b"ab") == b"ab"


def test_abandoned_encoders_close_cleanly() -> None:
    for response_format in ("mp3", "opus", "aac", "flac"):
        encoder = stream_encoder(response_format)
        encoder.encode(speech_like(0.3))
        encoder.close()
        encoder.close()  # idempotent


@pytest.mark.anyio
async def test_codecs_run_off_the_event_loop() -> None:
    """While 20 s of audio is encoded to mp3 (~0.4 s of CPU), the loop keeps turning;
    an inline encoder would let it turn only before and after."""
    encoding = SpeechEncoding(threads=2)
    pcm = speech_like(20.0)
    ticks = 0
    done = anyio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            await anyio.sleep(0)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        data = await encoding.whole_file("mp3", RATE, pcm)
        done.set()
    assert len(data) > 1000
    assert ticks > 20, ticks


@pytest.mark.anyio
async def test_an_encoder_failure_is_an_api_error() -> None:
    encoding = SpeechEncoding(threads=1)
    with pytest.raises(ApiError) as caught:
        encoding.stream("opus", 44100)  # the plan refuses this rate; here it must not crash
    assert (caught.value.status, caught.value.code) == (500, "encoder_error")
    with pytest.raises(ApiError):
        await encoding.whole_file("aac", 44000, speech_like(0.1, 44000))
