"""Streaming sample-rate conversion for s16le mono PCM (e.g. espeak's 22050 Hz to the
24 kHz OpenAI clients expect from ``pcm``), through libsoxr (the ``soxr`` wheel).

Why soxr and not interpolation: linear interpolation aliases (no low-pass before
decimating, e.g. 22050 -> 8000 Hz folds everything above 4 kHz back into the band)
and dulls the highs when upsampling; soxr's "HQ" band-limited filter does neither,
at a small fraction of the synthesis cost.

Guarantees the tts replica relies on: the output length depends only on the input
length, never on how the input was split into pieces (the api's failover skips audio
by sample offset, so two replicas must count samples alike); the samples themselves
agree between splits to within 2 LSB (soxr's float rounding differs by block). Output
lags input by the filter's delay while streaming; ``flush`` returns the rest.
"""

from __future__ import annotations

import numpy as np
import soxr

QUALITY = "HQ"  # soxr's default: 20-bit precision, ample for 16-bit speech


class Resampler:
    """Feed pieces with ``process``, then ``flush`` once at the end."""

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
        self.src_rate, self.dst_rate = src_rate, dst_rate
        self._stream = (
            soxr.ResampleStream(src_rate, dst_rate, 1, dtype="int16", quality=QUALITY)
            if src_rate != dst_rate
            else None
        )
        self._odd = b""  # a byte of a sample split across pieces

    def process(self, pcm: bytes) -> bytes:
        return self._convert(pcm, last=False)

    def flush(self) -> bytes:
        return self._convert(b"", last=True)

    def _convert(self, pcm: bytes, *, last: bool) -> bytes:
        if self._odd:
            pcm = self._odd + pcm
        cut = len(pcm) - len(pcm) % 2
        pcm, self._odd = pcm[:cut], pcm[cut:]
        if self._stream is None:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2")
        out = self._stream.resample_chunk(samples, last=last)
        return out.astype("<i2", copy=False).tobytes()
