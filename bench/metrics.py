"""Serving metrics from per-request timings, with vLLM's ``bench serve`` definitions.

Per request (seconds, measured by the client):

    TTFT   first token-bearing chunk - request sent
    ITL    gap between consecutive token-bearing chunks (one entry per gap)
    TPOT   (E2E - TTFT) / (output_tokens - 1), defined only when output_tokens > 1
    E2E    last byte of the response - request sent

Output tokens come from the server's ``usage`` when it sent one, else from the
number of token-bearing chunks (a chunk may carry several tokens when the server
coalesces, so TPOT from ``usage`` is the figure to trust, not ITL).

Percentiles interpolate linearly between order statistics, as ``numpy.percentile``
does by default, so figures compare with vLLM's. Goodput (DistServe's term, vLLM's
``--goodput``) counts requests that meet every given SLO, per second of the run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request; times in seconds."""

    index: int
    prompt_len: int  # the server's usage.prompt_tokens when given, else the dataset's
    expected_output_len: int
    start_s: float = 0.0  # since the run began
    success: bool = False
    output_tokens: int = 0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def token_times_s(self) -> list[float]:
        """When each output token arrived, since the run began. Tokens the usage
        counted beyond the chunks seen are put on the last chunk."""
        if not self.success or self.output_tokens == 0:
            return []
        times = [self.start_s + self.ttft_s]
        for gap in self.itl_s:
            times.append(times[-1] + gap)
        times = times[: self.output_tokens]
        times += [times[-1]] * (self.output_tokens - len(times))
        return times


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; 0.0 when empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of one latency metric, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]  # (q, value)

    @classmethod
    def of_seconds(cls, values: Sequence[float], qs: Sequence[float]) -> Distribution:
        ms = [1000.0 * v for v in values]
        if not ms:
            return cls(0.0, 0.0, 0.0, tuple((q, 0.0) for q in qs))
        return cls(
            mean=statistics.fmean(ms),
            median=statistics.median(ms),
            std=statistics.pstdev(ms),
            percentiles=tuple((q, percentile(ms, q)) for q in qs),
        )


def parse_goodput(specs: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 0.5, "tpot": 0.05}`` (seconds)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(
                f"goodput SLO {spec!r}: write NAME:MILLISECONDS with NAME one of "
                f"{', '.join(SLO_METRICS)}, e.g. ttft:500"
            )
        try:
            ms = float(value)
        except ValueError as e:
            raise ValueError(f"goodput SLO {spec!r}: {value!r} is not a number") from e
        if ms <= 0:
            raise ValueError(f"goodput SLO {spec!r}: the limit must be positive")
        slos[name] = ms / 1000.0
    return slos


def meets_slos(record: RequestRecord, slos: Mapping[str, float]) -> bool:
    """True when the request succeeded and is within every SLO. A request with one
    output token has no TPOT and passes a TPOT SLO, as in vLLM."""
    if not record.success:
        return False
    measured = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2el": record.latency_s}
    return all(measured[name] <= limit for name, limit in slos.items())


def output_tokens_per_second(records: Sequence[RequestRecord], duration_s: float) -> list[int]:
    """Output tokens that arrived in each whole second of the run."""
    buckets = [0] * max(1, math.ceil(duration_s))
    for record in records:
        for t in record.token_times_s():
            buckets[min(int(t), len(buckets) - 1)] += 1
    return buckets


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """The most requests in flight at once (sent, not yet answered)."""
    events = sorted(
        [(r.start_s, 1) for r in records] + [(r.start_s + r.latency_s, -1) for r in records],
        key=lambda e: (e[0], e[1]),  # at a tie, an end before a start
    )
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


@dataclass(frozen=True, slots=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: int
    max_concurrent_requests: int
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution

    def as_dict(self) -> dict[str, float | int | None]:
        """Flat, vLLM's key names (``mean_ttft_ms``, ``p99_itl_ms``, ...)."""
        row: dict[str, float | int | None] = {
            "completed": self.completed,
            "failed": self.failed,
            "duration": self.duration_s,
            "total_input_tokens": self.total_input,
            "total_output_tokens": self.total_output,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_output_tokens_per_s": self.max_output_tokens_per_s,
            "max_concurrent_requests": self.max_concurrent_requests,
        }
        for name in ("ttft", "tpot", "itl", "e2el"):
            dist: Distribution = getattr(self, name)
            row[f"mean_{name}_ms"] = dist.mean
            row[f"median_{name}_ms"] = dist.median
            row[f"std_{name}_ms"] = dist.std
            for q, value in dist.percentiles:
                row[f"p{q:g}_{name}_ms"] = value
        return row


def calculate_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    slos: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> BenchmarkMetrics:
    """Aggregate figures of one run; failed requests count only in ``failed``."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    done = [r for r in records if r.success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    goodput = None
    if slos:
        goodput = sum(meets_slos(r, slos) for r in done) / duration_s
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    return BenchmarkMetrics(
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration_s,
        total_input=total_input,
        total_output=total_output,
        request_throughput=len(done) / duration_s,
        request_goodput=goodput,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=max(output_tokens_per_second(done, duration_s)),
        max_concurrent_requests=peak_concurrency(done),
        ttft=Distribution.of_seconds([r.ttft_s for r in done], percentiles),
        tpot=Distribution.of_seconds(tpots, percentiles),
        itl=Distribution.of_seconds([gap for r in done for gap in r.itl_s], percentiles),
        e2el=Distribution.of_seconds([r.latency_s for r in done], percentiles),
    )


_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def format_table(metrics: BenchmarkMetrics, slos: Mapping[str, float] | None = None) -> str:
    """The printed result, laid out as vLLM prints it."""
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: float | int, digits: int = 2) -> None:
        text = f"{value}" if isinstance(value, int) else f"{value:.{digits}f}"
        lines.append(f"{label:<45} {text:>14}")

    row("Successful requests:", metrics.completed)
    row("Failed requests:", metrics.failed)
    row("Benchmark duration (s):", metrics.duration_s)
    row("Total input tokens:", metrics.total_input)
    row("Total generated tokens:", metrics.total_output)
    row("Request throughput (req/s):", metrics.request_throughput)
    if metrics.request_goodput is not None and slos:
        limits = " ".join(f"{k}:{1000 * v:g}" for k, v in slos.items())
        row(f"Request goodput (req/s) [{limits}]:", metrics.request_goodput)
    row("Output token throughput (tok/s):", metrics.output_throughput)
    row("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s)
    row("Peak concurrent requests:", metrics.max_concurrent_requests)
    row("Total token throughput (tok/s):", metrics.total_token_throughput)
    for name, title in _TITLES.items():
        dist: Distribution = getattr(metrics, name)
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        upper = name.upper()
        row(f"Mean {upper} (ms):", dist.mean)
        if 50.0 not in dict(dist.percentiles):  # else P50 says it
            row(f"Median {upper} (ms):", dist.median)
        for q, value in dist.percentiles:
            row(f"P{q:g} {upper} (ms):", value)
    lines.append("=" * 60)
    return "\n".join(lines)
