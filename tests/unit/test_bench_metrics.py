"""bench/metrics.py and bench/load.py on hand-built timings: the figures a serving
benchmark reports must be the ones vLLM's definitions give."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from bench.load import arrival_offsets
from bench.metrics import (
    RequestRecord,
    calculate_metrics,
    format_table,
    meets_slos,
    output_tokens_per_second,
    parse_goodput,
    peak_concurrency,
    percentile,
)


def record(index: int, start: float, ttft: float, itl: list[float], latency: float,
           output: int, prompt: int = 10, success: bool = True) -> RequestRecord:
    return RequestRecord(index, prompt, output, start_s=start, success=success,
                         output_tokens=output, ttft_s=ttft, itl_s=itl, latency_s=latency)


def test_percentile_interpolates_like_numpy() -> None:
    # numpy.percentile([1, 2, 3, 4], q) with its default linear method.
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_tpot_excludes_the_first_token() -> None:
    r = record(0, 0.0, ttft=0.1, itl=[0.02] * 4, latency=0.2, output=5)
    assert r.tpot_s == pytest.approx((0.2 - 0.1) / 4)
    assert record(1, 0.0, 0.1, [], 0.1, output=1).tpot_s is None  # one token: no TPOT
    assert record(2, 0.0, 0.1, [0.1], 0.2, output=2, success=False).tpot_s is None


def test_token_times_follow_chunks_and_fill_from_usage() -> None:
    r = record(0, 1.0, ttft=0.5, itl=[0.25, 0.25], latency=1.0, output=3)
    assert r.token_times_s() == [1.5, 1.75, 2.0]
    # Usage counted 5 tokens in 3 chunks: the extra 2 land on the last chunk.
    r.output_tokens = 5
    assert r.token_times_s() == [1.5, 1.75, 2.0, 2.0, 2.0]


def test_goodput_parsing_and_slos() -> None:
    slos = parse_goodput(["ttft:200", "tpot:50", "e2el:1000"])
    assert slos == {"ttft": 0.2, "tpot": 0.05, "e2el": 1.0}
    fast = record(0, 0.0, ttft=0.1, itl=[0.04] * 9, latency=0.46, output=10)
    slow_ttft = record(1, 0.0, ttft=0.3, itl=[0.04] * 9, latency=0.66, output=10)
    slow_tpot = record(2, 0.0, ttft=0.1, itl=[0.06] * 9, latency=0.64, output=10)
    failed = record(3, 0.0, ttft=0.0, itl=[], latency=0.0, output=0, success=False)
    assert meets_slos(fast, slos)
    assert not meets_slos(slow_ttft, slos)
    assert not meets_slos(slow_tpot, slos)
    assert not meets_slos(failed, slos)
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["ttft:0"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_aggregate_figures_on_hand_built_runs() -> None:
    records = [
        # start, ttft, itl, e2e, output tokens
        record(0, 0.0, 0.10, [0.05, 0.05, 0.05], 0.25, 4, prompt=100),
        record(1, 0.5, 0.20, [0.10, 0.10, 0.10], 0.50, 4, prompt=300),
        record(2, 1.0, 0.30, [0.20], 0.50, 2, prompt=200),
        record(3, 1.0, 0.0, [], 0.0, 0, prompt=999, success=False),
    ]
    duration = 2.0
    m = calculate_metrics(records, duration, parse_goodput(["ttft:250"]), percentiles=[50, 99])
    assert (m.completed, m.failed) == (3, 1)
    assert m.total_input == 600 and m.total_output == 10  # the failed request counts in neither
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(5.0)
    assert m.total_token_throughput == pytest.approx(305.0)
    assert m.request_goodput == pytest.approx(1.0)  # two of three within TTFT 250 ms
    assert m.ttft.mean == pytest.approx(200.0)
    assert m.ttft.median == pytest.approx(200.0)
    tpots_ms = [50.0, 100.0, 200.0]
    assert m.tpot.mean == pytest.approx(statistics.fmean(tpots_ms))
    assert dict(m.tpot.percentiles)[99] == pytest.approx(percentile(tpots_ms, 99))
    itls_ms = [50.0] * 3 + [100.0] * 3 + [200.0]
    assert m.itl.mean == pytest.approx(statistics.fmean(itls_ms))
    assert m.itl.median == pytest.approx(100.0)
    assert m.e2el.mean == pytest.approx(1000 * statistics.fmean([0.25, 0.5, 0.5]))
    flat = m.as_dict()
    assert flat["p99_itl_ms"] == pytest.approx(percentile(itls_ms, 99))
    assert flat["median_ttft_ms"] == pytest.approx(200.0)
    assert flat["request_goodput"] == pytest.approx(1.0)
    table = format_table(m, parse_goodput(["ttft:250"]))
    assert "Successful requests:" in table and "P99 ITL (ms):" in table
    assert "Request goodput (req/s) [ttft:250]:" in table


def test_throughput_over_time_and_peak_concurrency() -> None:
    records = [
        record(0, 0.0, 0.5, [0.25, 0.5], 1.25, 3),   # tokens at 0.5, 0.75, 1.25
        record(1, 0.9, 0.2, [1.0], 1.2, 2),          # tokens at 1.1, 2.1
        record(2, 2.2, 0.1, [], 0.1, 1),             # token at 2.3; ends as nothing runs
    ]
    assert output_tokens_per_second(records, 2.5) == [2, 2, 2]
    assert peak_concurrency(records) == 2
    # A request that starts exactly when another ends does not overlap it.
    back_to_back = [record(0, 0.0, 0.1, [], 1.0, 1), record(1, 1.0, 0.1, [], 1.0, 1)]
    assert peak_concurrency(back_to_back) == 1


def test_arrivals_are_poisson_at_the_rate_and_seeded() -> None:
    offsets = arrival_offsets(4001, request_rate=20.0, burstiness=1.0, seed=3)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.pstdev(gaps) == pytest.approx(1 / 20, rel=0.1)
    assert arrival_offsets(50, 20.0, 1.0, seed=3) == offsets[:50]
    assert arrival_offsets(50, 20.0, 1.0, seed=4) != offsets[:50]
    # Burstier (gamma shape < 1): the same mean gap, more spread.
    bursty = arrival_offsets(4001, 20.0, 0.25, seed=3)
    bursty_gaps = [b - a for a, b in itertools.pairwise(bursty)]
    assert statistics.fmean(bursty_gaps) == pytest.approx(1 / 20, rel=0.1)
    assert statistics.pstdev(bursty_gaps) > 1.5 * statistics.pstdev(gaps)
    assert arrival_offsets(5, math.inf, 1.0, seed=0) == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_offsets(5, 0.0, 1.0, seed=0)
