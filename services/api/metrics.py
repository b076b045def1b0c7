"""Prometheus metrics of the text path, in the text exposition format, under
vLLM's names where vLLM has one (so existing dashboards work) and
``meshserve:api_*`` where it does not. Every vLLM metric carries
``model_name``, as vLLM's do.

No I/O and no client library: counters and histograms are plain numbers that the
handlers update; ``render`` is called by ``GET /metrics``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.protocol.generation import SchedulerStatus

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
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, *samples: str) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

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
            metric(name, "histogram", help_text, *histogram.lines(name, labels))
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
        return "\n".join(lines) + "\n"
