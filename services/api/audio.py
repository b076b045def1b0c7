"""Audio on the HTTP side: OpenAI's response formats and how each is made from PCM.

The mesh always carries s16le mono PCM; this module decides what a client gets.

| format | container, codec       | streamed as                                    |
|--------|------------------------|------------------------------------------------|
| mp3    | MPEG audio, LAME       | frames as they are encoded (the default, as OpenAI's) |
| opus   | Ogg, libopus           | Ogg pages of at most 100 ms                    |
| aac    | ADTS, ffmpeg's AAC     | ADTS frames as they are encoded                |
| flac   | native FLAC            | frames; STREAMINFO says "length unknown"       |
| wav    | RIFF, s16le            | a 44-byte header with 0xFFFFFFFF sizes, as OpenAI's |
| pcm    | none, s16le            | the PCM as is (OpenAI's ``pcm``)               |

``wav`` and ``pcm`` are framed here (a header is cheaper than a codec library call
and keeps OpenAI's exact streamed header); the four codecs go through PyAV
(``audio_codec.py``). A buffered body (``"stream": false``) is written to a seekable
file instead, so it gets what only a rewrite at the end can give: exact WAV sizes, an
MP3 LAME tag with the encoder delay and padding (players trim them), a FLAC
STREAMINFO with the length and MD5.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

DEFAULT_SAMPLE_RATE = 24000  # what OpenAI clients expect from `pcm`
DEFAULT_FORMAT = "mp3"  # OpenAI's default when ``response_format`` is absent

# The rates each codec accepts (FLAC and the raw formats take any).
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """One OpenAI ``response_format``: its media type and, for a codec, how PyAV
    writes it (``container`` and ``codec`` are None for the formats framed here)."""

    name: str
    media_type: str
    container: str | None = None
    codec: str | None = None
    bit_rate: int = 0  # 0: the codec's own choice (lossless FLAC)
    sample_rates: tuple[int, ...] = ()  # () means any rate
    muxer_options: tuple[tuple[str, str], ...] = ()

    @property
    def uses_codec(self) -> bool:
        return self.codec is not None

    def sample_rate_problem(self, sample_rate: int) -> str | None:
        """Why this format cannot carry ``sample_rate``, or None."""
        if not self.sample_rates or sample_rate in self.sample_rates:
            return None
        rates = ", ".join(str(r) for r in self.sample_rates)
        return f"response_format {self.name!r} supports sample_rate {rates}, not {sample_rate}"


FORMATS: dict[str, AudioFormat] = {
    # Bit rates for mono speech: transparent to the ear and ~3x smaller than 128 kbps.
    "mp3": AudioFormat("mp3", "audio/mpeg", "mp3", "libmp3lame", 64_000, MP3_RATES),
    # Ogg's default page lasts 1 s; 100 ms pages keep the stream's latency low.
    "opus": AudioFormat("opus", "audio/ogg", "ogg", "libopus", 32_000, OPUS_RATES,
                        (("page_duration", "100000"),)),
    "aac": AudioFormat("aac", "audio/aac", "adts", "aac", 64_000, AAC_RATES),
    "flac": AudioFormat("flac", "audio/flac", "flac", "flac"),
    "wav": AudioFormat("wav", "audio/wav"),
    "pcm": AudioFormat("pcm", "audio/pcm"),
}
RESPONSE_FORMATS = tuple(FORMATS)

_UNKNOWN_SIZE = 0xFFFFFFFF


class StreamEncoder(Protocol):
    """Turns a stream of s16le mono PCM into a format's bytes, piece by piece.

    ``encode`` returns what is ready (maybe nothing: codecs work in frames),
    ``finish`` the rest once the PCM ended; ``close`` frees the encoder whether or
    not it finished (idempotent). One caller at a time."""

    def encode(self, pcm: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def close(self) -> None: ...


def wav_header(sample_rate: int, num_samples: int | None) -> bytes:
    """A 44-byte PCM s16le mono WAV header; ``num_samples`` None: length unknown
    (streaming), written as 0xFFFFFFFF as OpenAI's streamed WAV files are."""
    if num_samples is None:
        data_size = riff_size = _UNKNOWN_SIZE
    else:
        data_size = num_samples * 2
        riff_size = min(36 + data_size, _UNKNOWN_SIZE)
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", riff_size, b"WAVE",
        b"fmt ", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16,
        b"data", min(data_size, _UNKNOWN_SIZE),
    )


class RawStream:
    """``pcm`` and ``wav``: the PCM as it comes, behind a streaming WAV header."""

    def __init__(self, header: bytes) -> None:
        self._header = header  # sent in front of the first bytes, then never again

    def encode(self, pcm: bytes) -> bytes:
        out, self._header = self._header + pcm, b""
        return out

    def finish(self) -> bytes:
        # A stream without audio is still a well-formed (empty) file.
        return self.encode(b"")

    def close(self) -> None:
        pass


def raw_stream(audio_format: AudioFormat, sample_rate: int) -> RawStream:
    assert not audio_format.uses_codec, audio_format
    return RawStream(wav_header(sample_rate, None) if audio_format.name == "wav" else b"")


def raw_whole_file(audio_format: AudioFormat, sample_rate: int, pcm: bytes) -> bytes:
    """A complete ``wav`` (exact sizes) or ``pcm`` body."""
    assert not audio_format.uses_codec, audio_format
    if audio_format.name == "wav":
        return wav_header(sample_rate, len(pcm) // 2) + pcm
    return pcm


class EncodingError(RuntimeError):
    """The codec library refused the audio (a bug or a broken build, not bad input:
    formats and rates are checked before a request reaches the mesh)."""
