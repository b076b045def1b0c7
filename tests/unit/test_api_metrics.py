"""/metrics: vLLM's metric names and Prometheus text exposition."""

from __future__ import annotations

import re

from services.api.metrics import ApiMetrics, Histogram
from shared.protocol.generation import SchedulerStatus

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9.e+-]+$')


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")), line
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
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


def test_without_a_scheduler_status_its_gauges_are_absent() -> None:
    text = ApiMetrics("m").render(None, tokenizers=0, inflight=0, rejected_messages=0)
    assert "vllm:num_requests_running" not in text
    assert samples(text)["meshserve:api_workers"] == 0


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((1.0, 2.0))
    for value in (0.5, 1.5, 3.0):
        histogram.observe(value)
    assert histogram.lines("h", "") == [
        'h_bucket{le="1.0"} 1', 'h_bucket{le="2.0"} 2', 'h_bucket{le="+Inf"} 3',
        "h_sum 5.0", "h_count 3"]


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
    text = metrics.render(None, tokenizers=1, inflight=0, rejected_messages=0)
    assert 'vllm:inter_token_latency_seconds_count{model_name="m"} 3' in text
    assert 'vllm:inter_token_latency_seconds_bucket{model_name="m",le="0.3"} 2' in text
    assert 'vllm:inter_token_latency_seconds_bucket{model_name="m",le="0.5"} 3' in text
