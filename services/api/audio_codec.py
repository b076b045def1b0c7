"""mp3, opus, aac and flac through PyAV (ffmpeg's muxers and encoders: LAME, libopus,
ffmpeg's AAC, ffmpeg's FLAC, all inside the ``av`` wheel).

Pure and synchronous: no event loop here. Encoding costs ~20 ms of CPU per second of
24 kHz audio for mp3 and aac, which is why ``speech_encoding.py`` runs these calls in
worker threads (PyAV releases the GIL inside the codec).

A streamed body is muxed into a write-only sink: ffmpeg sees an unseekable output
and writes every header up front with "length unknown" (the MP3 muxer then leaves
out its Xing/LAME frame, the FLAC muxer writes STREAMINFO without a sample count,
both valid). A whole body is muxed into a seekable buffer, so the muxers go back
and fill those in.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

from services.api.audio import AudioFormat, EncodingError


class _Sink:
    """A write-only file: what the muxer wrote since the last ``take``. It has no
    ``seek``, which is what tells ffmpeg the output is a stream."""

    def __init__(self) -> None:
        self._data = bytearray()

    def write(self, data: bytes) -> int:
        self._data += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._data)
        self._data.clear()
        return out


class _CodecWriter:
    """One PyAV output container with one mono audio stream, fed s16le PCM."""

    def __init__(self, audio_format: AudioFormat, sample_rate: int, file: BinaryIO | _Sink):
        assert audio_format.uses_codec and audio_format.container, audio_format
        problem = audio_format.sample_rate_problem(sample_rate)
        if problem is not None:
            raise EncodingError(problem)
        self.sample_rate = sample_rate
        try:
            self._container = av.open(file, "w", format=audio_format.container,
                                      options=dict(audio_format.muxer_options))
            self._stream = self._container.add_stream(audio_format.codec, rate=sample_rate,
                                                      layout="mono")
            if audio_format.bit_rate:
                self._stream.bit_rate = audio_format.bit_rate
        except av.FFmpegError as e:
            raise EncodingError(f"cannot open a {audio_format.name} encoder: {e}") from e
        self._time_base = Fraction(1, sample_rate)
        self._samples = 0
        self._odd = b""  # half a sample, kept for the next piece
        self._closed = False

    def write(self, pcm: bytes) -> None:
        if self._odd:
            pcm = self._odd + pcm
        cut = len(pcm) - len(pcm) % 2
        pcm, self._odd = pcm[:cut], pcm[cut:]
        if not pcm:
            return
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.time_base = self._time_base
        frame.pts = self._samples
        self._samples += samples.shape[1]
        self._encode(frame)

    def end(self) -> None:
        """Flush the codec and write the trailer (the file is complete after this)."""
        self._encode(None)
        try:
            # Without a single packet ffmpeg never wrote the header: an input that made
            # no sound still gets a well-formed (empty) file.
            self._container.start_encoding()
        except av.FFmpegError as e:
            raise EncodingError(f"cannot start the file: {e}") from e
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._container.close()
        except av.FFmpegError as e:
            raise EncodingError(f"cannot finish the file: {e}") from e

    def _encode(self, frame: av.AudioFrame | None) -> None:
        try:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        except av.FFmpegError as e:
            raise EncodingError(f"encoding failed: {e}") from e


class CodecStream:
    """A ``StreamEncoder`` for a codec format: bytes come out as frames complete."""

    def __init__(self, audio_format: AudioFormat, sample_rate: int) -> None:
        self._sink = _Sink()
        self._writer = _CodecWriter(audio_format, sample_rate, self._sink)

    def encode(self, pcm: bytes) -> bytes:
        self._writer.write(pcm)
        return self._sink.take()

    def finish(self) -> bytes:
        self._writer.end()
        return self._sink.take()

    def close(self) -> None:
        self._writer.close()


def codec_whole_file(audio_format: AudioFormat, sample_rate: int, pcm: bytes) -> bytes:
    """A complete file of ``pcm`` in ``audio_format``, headers rewritten with exact
    lengths where the container has them."""
    buffer = io.BytesIO()
    writer = _CodecWriter(audio_format, sample_rate, buffer)
    try:
        writer.write(pcm)
        writer.end()
    finally:
        writer.close()
    return buffer.getvalue()
