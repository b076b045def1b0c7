"""Streaming linear resampling of s16le PCM."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tts.resample import LinearResampler


def tone(seconds: float, rate: int, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * 12000).astype("<i2").tobytes()


def resample_whole(pcm: bytes, src: int, dst: int) -> bytes:
    resampler = LinearResampler(src, dst)
    return resampler.process(pcm) + resampler.flush()


def test_length_and_pitch_follow_the_new_rate() -> None:
    out = np.frombuffer(resample_whole(tone(1.0, 22050), 22050, 24000), dtype="<i2")
    assert abs(len(out) - 24000) <= 1
    spectrum = np.abs(np.fft.rfft(out.astype(np.float64)))
    peak_hz = np.argmax(spectrum) * 24000 / len(out)
    assert abs(peak_hz - 440.0) < 2.0


def test_same_rate_is_a_passthrough() -> None:
    pcm = tone(0.1, 16000)
    assert resample_whole(pcm, 16000, 16000) == pcm


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([(22050, 24000), (22050, 16000), (22050, 48000), (24000, 8000)]),
    st.lists(st.integers(0, 700), max_size=12),
)
def test_any_split_gives_the_same_output_as_the_whole(
    rates: tuple[int, int], cuts: list[int]
) -> None:
    src, dst = rates
    pcm = tone(0.2, src, 300.0)
    whole = resample_whole(pcm, src, dst)
    resampler = LinearResampler(src, dst)
    pieces, start = [], 0
    for cut in cuts:
        end = min(len(pcm), start + 2 * cut)
        pieces.append(resampler.process(pcm[start:end]))
        start = end
    pieces.append(resampler.process(pcm[start:]))
    pieces.append(resampler.flush())
    assert b"".join(pieces) == whole
