"""/metrics: vLLM's metric names and Prometheus text exposition (rendered by
prometheus_client, read back by its own parser)."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from services.api.metrics import ApiMetrics, SpeechMetrics
from shared.protocol.generation import SchedulerStatus, WorkerStatus
from shared.protocol.speech import SpeechStatus

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9.e+-]+$')
LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def key(sample: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """A sample's name and label set: label order is not part of the format."""
    name, _, labels = sample.partition("{")
    return name, frozenset(LABEL.findall(labels))


class Samples(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    def __getitem__(self, sample: str) -> float:  # type: ignore[override]
        return super().__getitem__(key(sample))


def samples(text: str) -> Samples:
    out = Samples()
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")), line
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        out[key(name)] = float(value)
    # And what Prometheus' own parser makes of it: every line parses.
    assert list(text_string_to_metric_families(text))
    return out


def test_counts_render_under_vllm_names() -> None:
    metrics = ApiMetrics('tiny "model"')
    metrics.request_succeeded(["stop", "length"], prompt_tokens=4, completion_tokens=6,
                              ttft_s=0.2, latency_s=1.2)
    metrics.request_failed(429, "server_busy")
    metrics.client_disconnected()
    text = metrics.render(SchedulerStatus(workers=2, running=3, waiting=1, kv_usage=0.25),
                          tokenizers=2, inflight=5, rejected_messages=7)
    got = samples(text)
    labels = 'model_name="tiny \\"model\\""'
    assert got[f"vllm:num_requests_running{{{labels}}}"] == 3
    assert got[f"vllm:num_requests_waiting{{{labels}}}"] == 1
    assert got[f"vllm:kv_cache_usage_perc{{{labels}}}"] == 0.25
    assert got[f"vllm:prompt_tokens_total{{{labels}}}"] == 4
    assert got[f"vllm:generation_tokens_total{{{labels}}}"] == 6
    assert got[f'vllm:request_success_total{{{labels},finished_reason="stop"}}'] == 1
    assert got[f'vllm:request_success_total{{{labels},finished_reason="length"}}'] == 1
    assert got[f"vllm:time_to_first_token_seconds_count{{{labels}}}"] == 1
    assert got[f'vllm:time_to_first_token_seconds_bucket{{{labels},le="0.3"}}'] == 1
    assert got[f'vllm:time_to_first_token_seconds_bucket{{{labels},le="0.15"}}'] == 0
    assert got[f"vllm:request_time_per_output_token_seconds_sum{{{labels}}}"] == 0.2
    assert got['meshserve:api_request_errors_total{status="429",code="server_busy"}'] == 1
    assert got["meshserve:api_client_disconnects_total"] == 1
    assert got["meshserve:api_requests_inflight"] == 5
    assert got["meshserve:api_tokenizer_replicas"] == 2
    assert got["meshserve:api_workers"] == 2
    assert got["meshserve:api_rejected_messages_total"] == 7


def test_per_worker_series_carry_a_worker_label() -> None:
    status = SchedulerStatus(workers=2, running=3, waiting=1, per_worker=[
        WorkerStatus("worker/0", waiting=1, running=2, prefix_cache_queries=100,
                     prefix_cache_hits=80, requests_placed=5, rebalanced_in=0, kv_usage=0.5),
        WorkerStatus("worker/1", waiting=0, running=1, prefix_cache_queries=40,
                     prefix_cache_hits=0, requests_placed=2, rebalanced_in=1, role="decode",
                     transfers_in_flight=2, transfers_completed=9, transfers_failed=1,
                     transfer_bytes=4096),
    ])
    got = samples(ApiMetrics("m").render(status, tokenizers=1, inflight=0,
                                         rejected_messages=0))
    w0, w1 = 'model_name="m",worker="worker/0"', 'model_name="m",worker="worker/1"'
    assert got[f"meshserve:worker_requests_waiting{{{w0}}}"] == 1
    assert got[f"meshserve:worker_requests_running{{{w1}}}"] == 1
    assert got[f"meshserve:worker_prefix_cache_hits_total{{{w0}}}"] == 80
    assert got[f"meshserve:worker_prefix_cache_queries_total{{{w1}}}"] == 40
    assert got[f"meshserve:worker_requests_placed_total{{{w0}}}"] == 5
    assert got[f"meshserve:worker_requests_rebalanced_in_total{{{w1}}}"] == 1
    assert got[f"meshserve:worker_kv_cache_usage_perc{{{w0}}}"] == 0.5
    assert got[f"meshserve:worker_kv_transfers_in_flight{{{w1}}}"] == 2
    assert got[f"meshserve:worker_kv_transfers_completed_total{{{w1}}}"] == 9
    assert got[f"meshserve:worker_kv_transfers_failed_total{{{w1}}}"] == 1
    assert got[f"meshserve:worker_kv_transfer_bytes_total{{{w1}}}"] == 4096
    assert got[f"meshserve:worker_kv_transfer_bytes_total{{{w0}}}"] == 0


def test_without_a_scheduler_status_its_gauges_are_absent() -> None:
    text = ApiMetrics("m").render(None, tokenizers=0, inflight=0, rejected_messages=0)
    assert "vllm:num_requests_running" not in text
    assert samples(text)["meshserve:api_workers"] == 0


def test_histogram_buckets_are_cumulative() -> None:
    metrics = ApiMetrics("m")
    for tokens in (1, 3, 7000):
        metrics.request_succeeded(["stop"], tokens, 1, None, 1.0)
    got = samples(metrics.render(None, tokenizers=0, inflight=0, rejected_messages=0))
    bucket = 'vllm:request_prompt_tokens_bucket{model_name="m",le="%s"}'
    assert [got[bucket % le] for le in ("1.0", "2.0", "5.0", "5000.0", "10000.0", "+Inf")] \
        == [1, 1, 2, 2, 3, 3]
    assert got['vllm:request_prompt_tokens_sum{model_name="m"}'] == 7004
    assert got['vllm:request_prompt_tokens_count{model_name="m"}'] == 3
    assert not any(name.endswith("_created") for name, _ in got)  # off, as in vLLM


def test_speech_metrics_and_replica_statuses() -> None:
    metrics = SpeechMetrics()
    metrics.running, metrics.ready_replicas = 2, 1
    metrics.finished("ok", input_chars=12, audio_s=2.0, first_audio_s=0.1, elapsed_s=1.0)
    metrics.finished("cancelled", input_chars=3, audio_s=0.5, first_audio_s=None, elapsed_s=0.2)
    status = SpeechStatus(engines=2, engines_ready=2, engines_busy=1, requests=1,
                          queued_chunks=3, running_chunks=1, completed=5, cancelled=1,
                          cancelled_running=0, busy_rejections=0, engine_restarts=2)
    got = samples(metrics.render({"tts/0": status}))
    assert metrics.requests == {"ok": 1, "cancelled": 1}
    assert got['meshserve:speech_requests_total{outcome="ok"}'] == 1
    assert got["meshserve:speech_audio_seconds_total"] == 2.5
    assert got["meshserve:speech_input_characters_total"] == 15
    assert got["meshserve:speech_requests_running"] == 2
    assert got["meshserve:speech_replicas_ready"] == 1
    assert got["meshserve:speech_time_to_first_audio_seconds_count"] == 1
    assert got["meshserve:speech_request_duration_seconds_count"] == 1
    assert got['meshserve:speech_real_time_factor_bucket{le="0.5"}'] == 1
    assert got['meshserve:speech_tts_queued_chunks{replica="tts/0"}'] == 3
    assert got['meshserve:speech_tts_engine_restarts_total{replica="tts/0"}'] == 2


def test_inter_token_latency_is_observed_per_token() -> None:
    from services.api.requests import Choice
    from shared.protocol.generation import DetokenizeSpec, GenerateRequest, SamplingParams

    choice = Choice(0, GenerateRequest("r", SamplingParams(), DetokenizeSpec(), prompt="x"))
    choice.tokens_arrived(1, now=10.0)  # the first token: no gap yet
    choice.tokens_arrived(2, now=10.5)  # two tokens in one delta share the 0.5 s gap
    choice.tokens_arrived(0, now=11.0)  # text without new tokens changes nothing
    choice.tokens_arrived(1, now=11.0)
    assert choice.inter_token_latencies == [0.25, 0.25, 0.5]

    metrics = ApiMetrics("m")
    metrics.request_succeeded(["stop"], 3, 4, 0.1, 1.0, choice.inter_token_latencies)
    got = samples(metrics.render(None, tokenizers=1, inflight=0, rejected_messages=0))
    assert got['vllm:inter_token_latency_seconds_count{model_name="m"}'] == 3
    assert got['vllm:inter_token_latency_seconds_bucket{model_name="m",le="0.3"}'] == 2
    assert got['vllm:inter_token_latency_seconds_bucket{model_name="m",le="0.5"}'] == 3
