"""``python -m bench.serve`` end to end against a real mesh on the embedded model:
the saved JSON result holds sane figures and every request."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.e2e.mesh import Mesh, start_mesh

ROOT = Path(__file__).resolve().parents[2]
PROMPTS, INPUT_LEN, OUTPUT_LEN = 8, 32, 8


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(tmp_path_factory.mktemp("mesh"), extra_args=("--tts", "0"))
    try:
        yield running
    finally:
        running.stop()


def bench_serve(mesh: Mesh, result_dir: Path, name: str, *args: str) -> tuple[dict, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--base-url", mesh.base_url,
         "--save-result", "--result-dir", str(result_dir), "--result-filename", name, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr + mesh.logs()
    return json.loads((result_dir / name).read_text()), done.stdout, done.stderr


@pytest.mark.slow
def test_completions_benchmark_against_a_mesh(mesh: Mesh, tmp_path: Path) -> None:
    result, out, err = bench_serve(
        mesh, tmp_path, "completions.json",
        "--dataset-name", "random", "--num-prompts", str(PROMPTS),
        "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
        "--request-rate", "40", "--max-concurrency", "4", "--num-warmups", "2", "--seed", "1",
        "--goodput", "ttft:60000", "tpot:60000", "--metadata", "purpose=test", "--plot",
    )
    assert "Serving Benchmark Result" in out and "Mean TTFT (ms):" in out
    assert result["completed"] == PROMPTS and result["failed"] == 0
    assert result["prompt_kind"] == "token ids"
    assert result["total_input_tokens"] == PROMPTS * INPUT_LEN  # exact: ids, no specials
    assert result["total_output_tokens"] == PROMPTS * OUTPUT_LEN  # exact: ignore_eos
    duration = result["duration"]
    assert 0 < duration < 60
    assert result["request_throughput"] == pytest.approx(PROMPTS / duration)
    assert result["output_throughput"] == pytest.approx(PROMPTS * OUTPUT_LEN / duration)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert 1 <= result["max_concurrent_requests"] <= 4
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < result[f"mean_{metric}_ms"] < 60_000, metric
        assert result[f"p50_{metric}_ms"] <= result[f"p90_{metric}_ms"] <= result[
            f"p99_{metric}_ms"], metric
    assert result["median_e2el_ms"] > result["median_ttft_ms"]
    assert len(result["requests"]) == PROMPTS  # warm-ups are not in the result
    for request in result["requests"]:
        assert request["success"] and request["output_tokens"] == OUTPUT_LEN
        assert request["prompt_len"] == INPUT_LEN
        assert request["latency_s"] >= request["ttft_s"] > 0
    assert "bench.serve" in result["command"] and result["date"]
    assert "gpu" in result and result["metadata"] == {"purpose": "test"}
    if find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in err
    else:
        assert (tmp_path / "completions-latency-cdf.png").is_file()


@pytest.mark.slow
def test_chat_benchmark_uses_text_prompts(mesh: Mesh, tmp_path: Path) -> None:
    result, _, _ = bench_serve(
        mesh, tmp_path, "chat.json", "--endpoint", "/v1/chat/completions",
        "--dataset-name", "prefix", "--prefix-len", "16", "--num-prefixes", "2",
        "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "4",
        "--no-progress",
    )
    assert result["completed"] == 4 and result["prompt_kind"] == "text"
    # The chat template wraps each 24-token prompt in its own tokens.
    assert all(r["prompt_len"] > 24 and r["output_tokens"] == 4 for r in result["requests"])
