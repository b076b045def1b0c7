"""Streaming resampling of s16le PCM through soxr."""

from __future__ import annotations

import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tts.resample import Resampler


def tone(seconds: float, rate: int, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * 12000).astype("<i2").tobytes()


def resample_whole(pcm: bytes, src: int, dst: int) -> bytes:
    resampler = Resampler(src, dst)
    return resampler.process(pcm) + resampler.flush()


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def test_length_and_pitch_follow_the_new_rate() -> None:
    out = samples(resample_whole(tone(1.0, 22050), 22050, 24000))
    assert abs(len(out) - 24000) <= 1
    spectrum = np.abs(np.fft.rfft(out))
    peak_hz = np.argmax(spectrum) * 24000 / len(out)
    assert abs(peak_hz - 440.0) < 2.0


def test_the_waveform_is_preserved_closely() -> None:
    # A band-limited resampler reproduces a tone far below Nyquist almost exactly
    # (linear interpolation is off by ~1 % of the amplitude here).
    out = samples(resample_whole(tone(0.5, 22050, 1000.0), 22050, 24000))
    t = np.arange(len(out)) / 24000
    expected = np.sin(2 * np.pi * 1000.0 * t) * 12000
    middle = slice(1000, len(out) - 1000)  # away from the edges' filter transients
    assert np.max(np.abs(out[middle] - expected[middle])) < 12000 * 0.002


def test_downsampling_removes_what_the_new_rate_cannot_hold() -> None:
    # 6 kHz cannot exist at 8 kHz (Nyquist 4 kHz): interpolation folded it to 2 kHz (at
    # 56 % of its amplitude); a band-limited resampler removes it.
    out = samples(resample_whole(tone(0.5, 22050, 6000.0), 22050, 8000))
    assert np.sqrt(np.mean(out[500:-500] ** 2)) < 12000 * 0.001


def test_same_rate_is_a_passthrough() -> None:
    pcm = tone(0.1, 16000)
    assert resample_whole(pcm, 16000, 16000) == pcm


def test_a_sample_split_across_pieces_is_kept() -> None:
    pcm = tone(0.05, 22050)
    resampler = Resampler(22050, 24000)
    odd = resampler.process(pcm[:101]) + resampler.process(pcm[101:]) + resampler.flush()
    assert len(odd) == len(resample_whole(pcm, 22050, 24000))


def test_resampling_is_far_faster_than_real_time() -> None:
    pcm = tone(10.0, 22050)
    resampler = Resampler(22050, 24000)
    started = time.perf_counter()
    for start in range(0, len(pcm), 4410):  # 100 ms pieces, as espeak delivers them
        resampler.process(pcm[start:start + 4410])
    resampler.flush()
    # Generous for a loaded CI machine: measured ~20 ms for these 10 s of audio.
    assert time.perf_counter() - started < 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([(22050, 24000), (22050, 16000), (22050, 48000), (24000, 8000),
                     (22050, 44100), (22050, 11025)]),
    st.lists(st.integers(0, 700), max_size=12),
    st.floats(0.01, 0.3),
)
def test_any_split_gives_the_same_length_and_nearly_the_same_samples(
    rates: tuple[int, int], cuts: list[int], seconds: float
) -> None:
    src, dst = rates
    pcm = tone(seconds, src, 300.0)
    whole = resample_whole(pcm, src, dst)
    resampler = Resampler(src, dst)
    pieces, start = [], 0
    for cut in cuts:
        end = min(len(pcm), start + 2 * cut)
        pieces.append(resampler.process(pcm[start:end]))
        start = end
    pieces.append(resampler.process(pcm[start:]))
    pieces.append(resampler.flush())
    split = b"".join(pieces)
    # The length never depends on the split (failover counts samples); soxr's float
    # rounding may move a sample by a least significant bit or two.
    assert len(split) == len(whole)
    assert abs(len(whole) // 2 - len(pcm) // 2 * dst / src) <= 1
    assert np.max(np.abs(samples(split) - samples(whole)), initial=0) <= 2
