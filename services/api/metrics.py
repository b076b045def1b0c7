"""Prometheus metrics of the api, rendered by ``prometheus_client``: the text path under
vLLM's names where vLLM has one (so existing dashboards work) and ``meshserve:api_*``
where it does not (every vLLM metric carries ``model_name``, as vLLM's do); the
speech path under ``meshserve:speech_*`` (vLLM has no speech metrics to match).

What the handlers count lives in the library's ``Counter`` and ``Histogram`` objects
(vLLM's buckets); what other services report (the scheduler's ``SchedulerStatus``, the
tts replicas' ``SpeechStatus``, the actor's gauges) is read at scrape time by custom
collectors, so /metrics never shows a value older than the last status. Each
``ApiMetrics`` / ``SpeechMetrics`` has its own ``CollectorRegistry`` (no process-wide
global: tests and several apps in one process stay apart). As in vLLM, ``*_created``
series are off.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import disable_created_metrics

from shared.protocol.generation import SchedulerStatus
from shared.protocol.speech import SpeechStatus

disable_created_metrics()

# vLLM's buckets for request latencies (seconds) and token counts.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def _family(kind: str, name: str, help_text: str, value: float | None = None,
            labels: dict[str, str] | None = None) -> Metric:
    """One gauge or counter family with at most one sample (``value`` None: none)."""
    maker = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    names = list(labels or {})
    family = maker(name, help_text, labels=names)
    if value is not None:
        family.add_metric([(labels or {})[n] for n in names], value)
    return family


@dataclass(slots=True)
class MeshView:
    """What the api knows of the mesh at a scrape (set by ``ApiMetrics.render``)."""

    scheduler: SchedulerStatus | None = None
    tokenizers: int = 0
    inflight: int = 0
    rejected_messages: int = 0


# SchedulerStatus fields shown under each name: (kind, name, field, help).
_SCHEDULER_METRICS = (
    ("gauge", "vllm:num_requests_running", "running", "Requests in model execution batches."),
    ("gauge", "vllm:num_requests_waiting", "waiting", "Requests waiting to be processed."),
    ("gauge", "vllm:kv_cache_usage_perc", "kv_usage", "KV-cache usage. 1 means 100 percent."),
    ("counter", "vllm:prefix_cache_queries", "prefix_cache_queries",
     "Prefix cache queries, in terms of number of queried tokens."),
    ("counter", "vllm:prefix_cache_hits", "prefix_cache_hits",
     "Prefix cache hits, in terms of number of cached tokens."),
    ("counter", "vllm:num_preemptions", "num_preemptions", "Cumulative number of preemptions."),
    ("gauge", "meshserve:kv_cached_blocks", "kv_cached_blocks",
     "Free KV blocks still caching a prefix (evictable)."),
    ("counter", "meshserve:kv_evictions", "kv_evictions",
     "Cached KV blocks evicted (overwritten) to make room."),
    ("counter", "meshserve:kv_swap_outs", "num_swap_outs",
     "Requests preempted by swapping their KV blocks to host memory."),
    ("counter", "meshserve:kv_swap_ins", "num_swap_ins",
     "Swapped-out requests whose KV blocks came back to the device."),
    ("counter", "meshserve:kv_swapped_out_blocks", "swapped_out_blocks",
     "KV blocks copied device -> host."),
    ("counter", "meshserve:kv_swapped_in_blocks", "swapped_in_blocks",
     "KV blocks copied host -> device."),
    ("gauge", "meshserve:kv_host_blocks", "host_kv_blocks", "Host swap pool size in blocks."),
    ("gauge", "meshserve:kv_host_used_blocks", "host_kv_used_blocks",
     "Host swap blocks held by swapped-out requests."),
)

# WorkerStatus fields, one series per worker (label ``worker``): (kind, name, field, help).
_WORKER_METRICS = (
    ("gauge", "meshserve:worker_requests_waiting", "waiting",
     "Requests waiting in this worker's queue."),
    ("gauge", "meshserve:worker_requests_running", "running", "Requests running on this worker."),
    ("counter", "meshserve:worker_prefix_cache_queries", "prefix_cache_queries",
     "Prompt tokens looked up in this worker's prefix cache."),
    ("counter", "meshserve:worker_prefix_cache_hits", "prefix_cache_hits",
     "Prompt tokens found in this worker's prefix cache."),
    ("counter", "meshserve:worker_requests_placed", "requests_placed",
     "New requests routing placed on this worker."),
    ("counter", "meshserve:worker_requests_rebalanced_in", "rebalanced_in",
     "Waiting requests this worker took from a backlogged worker's queue."),
    ("gauge", "meshserve:worker_kv_cache_usage_perc", "kv_usage",
     "This worker's KV-cache usage. 1 means 100 percent."),
    ("gauge", "meshserve:worker_kv_transfers_in_flight", "transfers_in_flight",
     "Prefill/decode hand-offs (KV transfers) this worker sends or receives now."),
    ("counter", "meshserve:worker_kv_transfers_completed", "transfers_completed",
     "Prefill/decode hand-offs this worker sent or received that completed."),
    ("counter", "meshserve:worker_kv_transfers_failed", "transfers_failed",
     "Prefill/decode hand-offs this worker sent or received that failed (recomputed)."),
    ("counter", "meshserve:worker_kv_transfer_bytes", "transfer_bytes",
     "KV bytes this worker sent or received in hand-offs."),
)


def _worker_families(status: SchedulerStatus, model_name: str) -> Iterator[Metric]:
    for kind, name, field, help_text in _WORKER_METRICS:
        maker = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = maker(name, help_text, labels=["model_name", "worker"])
        for worker in status.per_worker:
            family.add_metric([model_name, worker.worker], getattr(worker, field))
        yield family


class MeshCollector:
    """The scheduler's last status and the actor's gauges, as metric families.
    Without a scheduler status its metrics are absent (not zero: nothing is known)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.view = MeshView()

    def collect(self) -> Iterator[Metric]:
        view, labels = self.view, {"model_name": self.model_name}
        if view.scheduler is not None:
            for kind, name, field, help_text in _SCHEDULER_METRICS:
                yield _family(kind, name, help_text, getattr(view.scheduler, field), labels)
            yield from _worker_families(view.scheduler, self.model_name)
        workers = view.scheduler.workers if view.scheduler else 0
        yield _family("gauge", "meshserve:api_requests_inflight",
                      "Mesh requests (choices) the api is waiting on.", view.inflight)
        yield _family("gauge", "meshserve:api_tokenizer_replicas", "Ready tokenizer replicas.",
                      view.tokenizers)
        yield _family("gauge", "meshserve:api_workers", "Workers the scheduler reports.", workers)
        yield _family("counter", "meshserve:api_rejected_messages",
                      "Mesh messages the api rejected (undecodable or nonsensical).",
                      view.rejected_messages)


class ApiMetrics:
    """What the api counts about text requests, and its /metrics text."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.mesh = MeshCollector(model_name)
        self.registry.register(self.mesh)
        model = ["model_name"]
        r = self.registry

        def histogram(name: str, help_text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, help_text, model, buckets=buckets,
                             registry=r).labels(model_name)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.",
                                     model, registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Generation tokens processed.", model,
                                         registry=r).labels(model_name)
        self._success = Counter("vllm:request_success", "Successfully processed requests.",
                                [*model, "finished_reason"], registry=r)
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "Time to first token in seconds.", LATENCY_BUCKETS)
        self.e2e_latency = histogram("vllm:e2e_request_latency_seconds",
                                     "End to end request latency in seconds.", LATENCY_BUCKETS)
        self.time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Time per output token in seconds, per request.", TPOT_BUCKETS)
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds",
            "Time between successive tokens of a request in seconds.", TPOT_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                               "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generation tokens per request.", TOKEN_BUCKETS)
        self._errors = Counter("meshserve:api_request_errors",
                               "Requests that ended in an HTTP error, by status and code.",
                               ["status", "code"], registry=r)
        self._disconnects = Counter("meshserve:api_client_disconnects",
                                    "Requests aborted because the client went away.",
                                    registry=r)
        self.model_name = model_name

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
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        for reason in finish_reasons:
            self._success.labels(self.model_name, reason).inc()
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(completion_tokens)
        self.e2e_latency.observe(latency_s)
        if ttft_s is not None:
            self.time_to_first_token.observe(ttft_s)
            if completion_tokens > 1:
                self.time_per_output_token.observe(
                    (latency_s - ttft_s) / (completion_tokens - 1))

    def request_failed(self, status: int, code: str | None) -> None:
        self._errors.labels(str(status), code or "").inc()

    def client_disconnected(self) -> None:
        self._disconnects.inc()

    def render(
        self,
        scheduler: SchedulerStatus | None,
        tokenizers: int,
        inflight: int,
        rejected_messages: int,
    ) -> str:
        """The exposition text, with the mesh as the actor sees it now."""
        self.mesh.view = MeshView(scheduler, tokenizers, inflight, rejected_messages)
        return generate_latest(self.registry).decode()


SPEECH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                          30.0, 60.0)
RTF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)

# SpeechStatus fields shown per tts replica: gauges, then lifetime counters (``_total``).
_REPLICA_GAUGES = ("engines", "engines_ready", "engines_busy", "requests", "queued_chunks",
                   "running_chunks")
_REPLICA_COUNTERS = ("completed", "cancelled", "cancelled_running", "busy_rejections",
                     "engine_restarts")


class ReplicaCollector:
    """Each tts replica's last ``SpeechStatus`` (set by ``SpeechMetrics.render``) and the
    gateway's own gauges."""

    PREFIX = "meshserve:speech_"

    def __init__(self, owner: SpeechMetrics) -> None:
        self.owner = owner
        self.replicas: dict[str, SpeechStatus] = {}

    def collect(self) -> Iterator[Metric]:
        p = self.PREFIX
        yield _family("gauge", f"{p}requests_running", "Speech requests in flight.",
                      self.owner.running)
        yield _family("gauge", f"{p}replicas_ready", "Ready tts replicas.",
                      self.owner.ready_replicas)
        statuses = sorted(self.replicas.items())
        for name in _REPLICA_GAUGES + _REPLICA_COUNTERS:
            counter = name in _REPLICA_COUNTERS
            maker = CounterMetricFamily if counter else GaugeMetricFamily
            family = maker(f"{p}tts_{name}",
                           f"Each tts replica's {name.replace('_', ' ')}, as it last reported.",
                           labels=["replica"])
            for replica, status in statuses:
                family.add_metric([replica], getattr(status, name))
            yield family


class SpeechMetrics:
    """What the api counts about speech requests (``meshserve:speech_*``)."""

    PREFIX = "meshserve:speech_"

    def __init__(self) -> None:
        p = self.PREFIX
        self.registry = r = CollectorRegistry()
        self.running = 0  # set by the gateway, read at scrape time
        self.ready_replicas = 0
        self._requests = Counter(f"{p}requests", "Speech requests ended, by outcome.",
                                 ["outcome"], registry=r)
        self._audio_seconds = Counter(f"{p}audio_seconds", "Seconds of audio delivered.",
                                      registry=r)
        self._input_chars = Counter(f"{p}input_characters",
                                    "Input characters of ended requests.", registry=r)
        self.time_to_first_audio = Histogram(
            f"{p}time_to_first_audio_seconds", "Time to the first audio of a request in seconds.",
            buckets=SPEECH_SECONDS_BUCKETS, registry=r)
        self.request_duration = Histogram(
            f"{p}request_duration_seconds", "Duration of successful speech requests in seconds.",
            buckets=SPEECH_SECONDS_BUCKETS, registry=r)
        self.real_time_factor = Histogram(  # wall time / audio time, ok requests
            f"{p}real_time_factor", "Wall time over audio time of successful speech requests.",
            buckets=RTF_BUCKETS, registry=r)
        self.replicas = ReplicaCollector(self)
        r.register(self.replicas)

    @property
    def requests(self) -> dict[str, float]:
        """Ended requests by outcome (ok | error | cancelled)."""
        return {
            sample.labels["outcome"]: sample.value
            for metric in self._requests.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }

    def finished(
        self,
        outcome: str,
        input_chars: int,
        audio_s: float,
        first_audio_s: float | None,
        elapsed_s: float,
    ) -> None:
        self._requests.labels(outcome).inc()
        self._input_chars.inc(input_chars)
        self._audio_seconds.inc(audio_s)
        if first_audio_s is not None:
            self.time_to_first_audio.observe(first_audio_s)
        if outcome == "ok":
            self.request_duration.observe(elapsed_s)
            if audio_s > 0:
                self.real_time_factor.observe(elapsed_s / audio_s)

    def render(self, replicas: dict[str, SpeechStatus]) -> str:
        """Exposition text, with each tts replica's last status (by replica name)."""
        self.replicas.replicas = dict(replicas)
        return generate_latest(self.registry).decode()


class _AuthRefusals:
    """The api's refusals as a collector: HTTP requests without a valid key, and mesh
    peers that failed the CURVE handshake on the api's sockets (shared/mesh_auth.py)."""

    def __init__(self, http_refused: int, zmq_refused: int) -> None:
        self.http_refused = http_refused
        self.zmq_refused = zmq_refused

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("meshserve:api_auth_failures",
                                  "HTTP requests refused with 401 (no or wrong API key).",
                                  value=self.http_refused)
        yield CounterMetricFamily("meshserve:zmq_auth_failures",
                                  "ZMQ peers refused at the CURVE handshake on the api's sockets.",
                                  value=self.zmq_refused)


def render_auth_metrics(http_refused: int, zmq_refused: int) -> str:
    """Exposition text of the api's refusals (``_AuthRefusals``)."""
    return generate_latest(_AuthRefusals(http_refused, zmq_refused)).decode()  # type: ignore[arg-type]
