"""Streaming sample-rate conversion for s16le mono PCM (e.g. espeak's 22050 Hz to the
24 kHz OpenAI clients expect from ``pcm``).

Linear interpolation: cheap, stateless across requests, and good enough for speech
(espeak-ng has little energy near the Nyquist frequency). Output sample ``j`` sits
at input position ``j * src / dst``, computed in integers so a long stream never
drifts, and pieces fed in any split give the same output as the whole at once.
"""

from __future__ import annotations

from math import gcd

import numpy as np


class LinearResampler:
    """Feed pieces with ``process``, then ``flush`` once at the end."""

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
        g = gcd(src_rate, dst_rate)
        self.src_rate, self.dst_rate = src_rate, dst_rate
        self._up = dst_rate // g
        self._down = src_rate // g
        self._consumed = 0  # input samples seen
        self._produced = 0  # output samples made
        self._tail = np.zeros(0, dtype=np.float64)  # the last input sample, kept for the next piece

    def process(self, pcm: bytes) -> bytes:
        return self._convert(pcm, final=False)

    def flush(self) -> bytes:
        return self._convert(b"", final=True)

    def _convert(self, pcm: bytes, *, final: bool) -> bytes:
        if self._up == self._down:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        buffer = np.concatenate((self._tail, samples)) if len(self._tail) else samples
        if len(buffer) == 0:
            return b""
        first = self._consumed - len(self._tail)  # input index of buffer[0]
        self._consumed += len(samples)
        last = self._consumed - 1  # input index of buffer[-1]
        # Final: everything up to the last input sample. Otherwise only outputs whose
        # right neighbour is already here.
        end = last * self._up // self._down + 1 if final else -(-last * self._up // self._down)
        positions = np.arange(self._produced, max(end, self._produced), dtype=np.int64)
        self._produced = max(end, self._produced)
        self._tail = buffer[-1:]
        if len(positions) == 0:
            return b""
        scaled = positions * self._down
        left = scaled // self._up - first
        frac = (scaled % self._up) / self._up
        right = np.minimum(left + 1, len(buffer) - 1)
        out = buffer[left] * (1.0 - frac) + buffer[right] * frac
        return np.clip(np.rint(out), -32768, 32767).astype("<i2").tobytes()
