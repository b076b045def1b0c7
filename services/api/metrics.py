"""Prometheus metrics of the api, in the text exposition format: the text path under
vLLM's names where vLLM has one (so existing dashboards work) and ``meshserve:api_*``
where it does not (every vLLM metric carries ``model_name``, as vLLM's do); the
speech path under ``meshserve:speech_*`` (vLLM has no speech metrics to match).

No I/O and no client library: counters and histograms are plain numbers that the
handlers update; ``render`` is called by ``GET /metrics``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.protocol.generation import SchedulerStatus
from shared.protocol.speech import SpeechStatus

# vLLM's buckets for request latencies (seconds) and token counts.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


@dataclass(slots=True)
class Histogram:
    """A cumulative-bucket histogram, as Prometheus exposes one."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        counts = self.counts or [0] * len(self.bounds)
        sep = "," if labels else ""
        plain = f"{{{labels}}}" if labels else ""
        return [
            *(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {n}'
              for bound, n in zip(self.bounds, counts, strict=True)),
            f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}',
            f"{name}_sum{plain} {self.total}",
            f"{name}_count{plain} {self.count}",
        ]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """Exposition text under construction: each metric is its HELP and TYPE lines
    followed by its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, *samples: str) -> None:
        self.lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

    def histogram(self, name: str, histogram: Histogram, help_text: str,
                  labels: str = "") -> None:
        self.metric(name, "histogram", help_text, *histogram.lines(name, labels))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class ApiMetrics:
    """What the api counts about text requests."""

    def __init__(self, model_name: str) -> None:
        self.labels = f'model_name="{_escape(model_name)}"'
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter[str] = Counter()  # by finish reason
        self.failed: Counter[tuple[int, str]] = Counter()  # by (status, code)
        self.client_disconnects = 0
        self.time_to_first_token = Histogram(LATENCY_BUCKETS)
        self.e2e_latency = Histogram(LATENCY_BUCKETS)
        self.time_per_output_token = Histogram(TPOT_BUCKETS)
        self.inter_token_latency = Histogram(TPOT_BUCKETS)
        self.request_prompt_tokens = Histogram(TOKEN_BUCKETS)
        self.request_generation_tokens = Histogram(TOKEN_BUCKETS)

    def request_succeeded(
        self,
        finish_reasons: list[str],
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        latency_s: float,
        inter_token_latencies: Iterable[float] = (),
    ) -> None:
        for gap in inter_token_latencies:
            self.inter_token_latency.observe(gap)
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        self.finished.update(finish_reasons)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(completion_tokens)
        self.e2e_latency.observe(latency_s)
        if ttft_s is not None:
            self.time_to_first_token.observe(ttft_s)
            if completion_tokens > 1:
                self.time_per_output_token.observe(
                    (latency_s - ttft_s) / (completion_tokens - 1))

    def request_failed(self, status: int, code: str | None) -> None:
        self.failed[(status, code or "")] += 1

    def client_disconnected(self) -> None:
        self.client_disconnects += 1

    def render(
        self,
        scheduler: SchedulerStatus | None,
        tokenizers: int,
        inflight: int,
        rejected_messages: int,
    ) -> str:
        labels = self.labels
        out = Exposition()
        metric = out.metric
        if scheduler is not None:
            metric("vllm:num_requests_running", "gauge", "Requests in model execution batches.",
                   f"vllm:num_requests_running{{{labels}}} {scheduler.running}")
            metric("vllm:num_requests_waiting", "gauge", "Requests waiting to be processed.",
                   f"vllm:num_requests_waiting{{{labels}}} {scheduler.waiting}")
            metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent.",
                   f"vllm:kv_cache_usage_perc{{{labels}}} {scheduler.kv_usage}")
            metric("vllm:prefix_cache_queries_total", "counter",
                   "Prefix cache queries, in terms of number of queried tokens.",
                   f"vllm:prefix_cache_queries_total{{{labels}}} "
                   f"{scheduler.prefix_cache_queries}")
            metric("vllm:prefix_cache_hits_total", "counter",
                   "Prefix cache hits, in terms of number of cached tokens.",
                   f"vllm:prefix_cache_hits_total{{{labels}}} {scheduler.prefix_cache_hits}")
            metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions.",
                   f"vllm:num_preemptions_total{{{labels}}} {scheduler.num_preemptions}")
            metric("meshserve:kv_cached_blocks", "gauge",
                   "Free KV blocks still caching a prefix (evictable).",
                   f"meshserve:kv_cached_blocks{{{labels}}} {scheduler.kv_cached_blocks}")
            metric("meshserve:kv_evictions_total", "counter",
                   "Cached KV blocks evicted (overwritten) to make room.",
                   f"meshserve:kv_evictions_total{{{labels}}} {scheduler.kv_evictions}")
            metric("meshserve:kv_swap_outs_total", "counter",
                   "Requests preempted by swapping their KV blocks to host memory.",
                   f"meshserve:kv_swap_outs_total{{{labels}}} {scheduler.num_swap_outs}")
            metric("meshserve:kv_swap_ins_total", "counter",
                   "Swapped-out requests whose KV blocks came back to the device.",
                   f"meshserve:kv_swap_ins_total{{{labels}}} {scheduler.num_swap_ins}")
            metric("meshserve:kv_swapped_out_blocks_total", "counter",
                   "KV blocks copied device -> host.",
                   f"meshserve:kv_swapped_out_blocks_total{{{labels}}} "
                   f"{scheduler.swapped_out_blocks}")
            metric("meshserve:kv_swapped_in_blocks_total", "counter",
                   "KV blocks copied host -> device.",
                   f"meshserve:kv_swapped_in_blocks_total{{{labels}}} "
                   f"{scheduler.swapped_in_blocks}")
            metric("meshserve:kv_host_blocks", "gauge", "Host swap pool size in blocks.",
                   f"meshserve:kv_host_blocks{{{labels}}} {scheduler.host_kv_blocks}")
            metric("meshserve:kv_host_used_blocks", "gauge",
                   "Host swap blocks held by swapped-out requests.",
                   f"meshserve:kv_host_used_blocks{{{labels}}} {scheduler.host_kv_used_blocks}")
        metric("vllm:prompt_tokens_total", "counter", "Prefill tokens processed.",
               f"vllm:prompt_tokens_total{{{labels}}} {self.prompt_tokens}")
        metric("vllm:generation_tokens_total", "counter", "Generation tokens processed.",
               f"vllm:generation_tokens_total{{{labels}}} {self.generation_tokens}")
        metric("vllm:request_success_total", "counter", "Successfully processed requests.",
               *(f'vllm:request_success_total{{{labels},finished_reason="{_escape(reason)}"}} '
                 f"{n}" for reason, n in sorted(self.finished.items())))
        for name, histogram, help_text in (
            ("vllm:time_to_first_token_seconds", self.time_to_first_token,
             "Time to first token in seconds."),
            ("vllm:e2e_request_latency_seconds", self.e2e_latency,
             "End to end request latency in seconds."),
            ("vllm:request_time_per_output_token_seconds", self.time_per_output_token,
             "Time per output token in seconds, per request."),
            ("vllm:inter_token_latency_seconds", self.inter_token_latency,
             "Time between successive tokens of a request in seconds."),
            ("vllm:request_prompt_tokens", self.request_prompt_tokens,
             "Prompt tokens per request."),
            ("vllm:request_generation_tokens", self.request_generation_tokens,
             "Generation tokens per request."),
        ):
            out.histogram(name, histogram, help_text, labels)
        metric("meshserve:api_request_errors_total", "counter",
               "Requests that ended in an HTTP error, by status and code.",
               *(f'meshserve:api_request_errors_total{{status="{status}",code="{_escape(code)}"}}'
                 f" {n}" for (status, code), n in sorted(self.failed.items())))
        metric("meshserve:api_client_disconnects_total", "counter",
               "Requests aborted because the client went away.",
               f"meshserve:api_client_disconnects_total {self.client_disconnects}")
        metric("meshserve:api_requests_inflight", "gauge",
               "Mesh requests (choices) the api is waiting on.",
               f"meshserve:api_requests_inflight {inflight}")
        metric("meshserve:api_tokenizer_replicas", "gauge", "Ready tokenizer replicas.",
               f"meshserve:api_tokenizer_replicas {tokenizers}")
        metric("meshserve:api_workers", "gauge", "Workers the scheduler reports.",
               f"meshserve:api_workers {scheduler.workers if scheduler else 0}")
        metric("meshserve:api_rejected_messages_total", "counter",
               "Mesh messages the api rejected (undecodable or nonsensical).",
               f"meshserve:api_rejected_messages_total {rejected_messages}")
        return out.text()


SPEECH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                          30.0, 60.0)
RTF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)

# SpeechStatus fields shown per tts replica: gauges, then lifetime counters (``_total``).
_REPLICA_GAUGES = ("engines", "engines_ready", "engines_busy", "requests", "queued_chunks",
                   "running_chunks")
_REPLICA_COUNTERS = ("completed", "cancelled", "cancelled_running", "busy_rejections",
                     "engine_restarts")


class SpeechMetrics:
    """What the api counts about speech requests (``meshserve:speech_*``)."""

    PREFIX = "meshserve:speech_"

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # by outcome: ok | error | cancelled
        self.audio_seconds = 0.0
        self.input_chars = 0
        self.running = 0
        self.ready_replicas = 0
        self.time_to_first_audio = Histogram(SPEECH_SECONDS_BUCKETS)
        self.request_duration = Histogram(SPEECH_SECONDS_BUCKETS)
        self.real_time_factor = Histogram(RTF_BUCKETS)  # wall time / audio time, ok requests

    def finished(
        self,
        outcome: str,
        input_chars: int,
        audio_s: float,
        first_audio_s: float | None,
        elapsed_s: float,
    ) -> None:
        self.requests[outcome] += 1
        self.input_chars += input_chars
        self.audio_seconds += audio_s
        if first_audio_s is not None:
            self.time_to_first_audio.observe(first_audio_s)
        if outcome == "ok":
            self.request_duration.observe(elapsed_s)
            if audio_s > 0:
                self.real_time_factor.observe(elapsed_s / audio_s)

    def render(self, replicas: dict[str, SpeechStatus]) -> str:
        """Exposition text, with each tts replica's last status (by replica name)."""
        p = self.PREFIX
        out = Exposition()
        out.metric(f"{p}requests_total", "counter", "Speech requests ended, by outcome.",
                   *(f'{p}requests_total{{outcome="{outcome}"}} {count}'
                     for outcome, count in sorted(self.requests.items())))
        out.metric(f"{p}audio_seconds_total", "counter", "Seconds of audio delivered.",
                   f"{p}audio_seconds_total {self.audio_seconds}")
        out.metric(f"{p}input_characters_total", "counter", "Input characters of ended requests.",
                   f"{p}input_characters_total {self.input_chars}")
        out.metric(f"{p}requests_running", "gauge", "Speech requests in flight.",
                   f"{p}requests_running {self.running}")
        out.metric(f"{p}replicas_ready", "gauge", "Ready tts replicas.",
                   f"{p}replicas_ready {self.ready_replicas}")
        out.histogram(f"{p}time_to_first_audio_seconds", self.time_to_first_audio,
                      "Time to the first audio of a request in seconds.")
        out.histogram(f"{p}request_duration_seconds", self.request_duration,
                      "Duration of successful speech requests in seconds.")
        out.histogram(f"{p}real_time_factor", self.real_time_factor,
                      "Wall time over audio time of successful speech requests.")
        statuses = sorted(replicas.items())
        for name in _REPLICA_GAUGES + _REPLICA_COUNTERS:
            counter = name in _REPLICA_COUNTERS
            metric = f"{p}tts_{name}" + ("_total" if counter else "")
            out.metric(metric, "counter" if counter else "gauge",
                       f"Each tts replica's {name.replace('_', ' ')}, as it last reported.",
                       *(f'{metric}{{replica="{_escape(replica)}"}} {getattr(status, name)}'
                         for replica, status in statuses))
        return out.text()


def render_auth_metrics(http_refused: int, zmq_refused: int) -> str:
    """The api's refusals: HTTP requests without a valid key, and mesh peers that
    failed the CURVE handshake on the api's sockets (``shared/mesh_auth.py``)."""
    out = Exposition()
    out.metric("meshserve:api_auth_failures_total", "counter",
               "HTTP requests refused with 401 (no or wrong API key).",
               f"meshserve:api_auth_failures_total {http_refused}")
    out.metric("meshserve:zmq_auth_failures_total", "counter",
               "ZMQ peers refused at the CURVE handshake on the api's sockets.",
               f"meshserve:zmq_auth_failures_total {zmq_refused}")
    return out.text()
