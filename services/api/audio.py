"""Audio on the HTTP side: the response formats meshserve can send and their bytes.

The mesh always carries s16le mono PCM; this module only frames it. ``pcm`` is the
PCM as is (OpenAI's ``pcm``: raw, no header). ``wav`` puts a 44-byte RIFF header in
front: a streamed file's length is not known when its header goes out, so both RIFF
and data sizes are 0xFFFFFFFF, as in OpenAI's streamed WAV files; a buffered file
(``"stream": false``) gets its exact sizes.
"""

from __future__ import annotations

import struct

RESPONSE_FORMATS = ("wav", "pcm")
# OpenAI's other formats: named so the 400 can say why they are refused.
UNSUPPORTED_FORMATS = ("mp3", "opus", "aac", "flac")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm"}
DEFAULT_SAMPLE_RATE = 24000  # what OpenAI clients expect from `pcm`

_UNKNOWN_SIZE = 0xFFFFFFFF


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


def stream_prefix(response_format: str, sample_rate: int) -> bytes:
    """What goes before the first audio bytes of a streamed body."""
    return wav_header(sample_rate, None) if response_format == "wav" else b""


def whole_file(response_format: str, sample_rate: int, pcm: bytes) -> bytes:
    """A complete, buffered body with exact sizes."""
    if response_format == "wav":
        return wav_header(sample_rate, len(pcm) // 2) + pcm
    return pcm
