"""Throughput of the whole mesh against the same engine in process.

Starts a mesh (`meshserve up`) on the embedded model unless --url is given, sends
--requests concurrent streamed completions through its OpenAI API, then runs the
same prompts through ``InProcessEngine`` (scheduler + KV manager + model runner in
one process, no sockets), and prints TTFT, TPOT, ITL, throughput and the ratio.

    .venv/bin/python -m bench.mesh_bench --requests 32 --prompt-len 128 --max-tokens 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import torch

from bench.client import make_client
from bench.inprocess import InProcessEngine
from bench.metrics import percentile
from bench.results import gpu_name
from services.worker.runner import ModelRunner
from shared.model_source import resolve_model_dir
from shared.protocol.generation import SamplingParams

FIRST_ORDINARY_TOKEN = 3  # the embedded tokenizer's specials are ids 0..2


@dataclass
class RequestTiming:
    start: float
    chunks: list[float] = field(default_factory=list)
    output_tokens: int = 0
    end: float = 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def started_mesh(model: str, extra: list[str], run_dir: str = "") -> Iterator[str]:
    """A mesh on ``run_dir`` (default: a new temporary one; give one to reach the
    mesh's CLI, e.g. `meshserve kv stats --run-dir`); yields its base URL."""
    port = free_port()
    run_dir = run_dir or tempfile.mkdtemp(prefix="msb-", dir="/tmp")
    args = [sys.executable, "-m", "services.supervisor.cli", "up", "--run-dir", run_dir,
            "--port", str(port), *extra]
    if model:
        args += ["--model", model]
    log = open(os.path.join(run_dir, "bench-mesh.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the mesh exited ({proc.returncode}); see {log.name}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the mesh did not become healthy in 180 s")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                      max_tokens: int, stream: bool) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    timing = RequestTiming(start=time.perf_counter())
    if not stream:
        response = await client.post(url + "/v1/completions", json=body)
        response.raise_for_status()
        timing.end = time.perf_counter()
        timing.output_tokens = response.json()["usage"]["completion_tokens"]
        return timing
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.output_tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                timing.chunks.append(time.perf_counter())
    timing.end = time.perf_counter()
    return timing


async def drive_mesh(url: str, prompts: list[list[int]], max_tokens: int,
                     stream: bool) -> list[RequestTiming]:
    # A pool as large as the load: httpx's default of 100 connections would quietly
    # cap a 256-request run at 100 in flight.
    async with make_client(max_connections=len(prompts), timeout_s=600) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        timings: list[RequestTiming] = [None] * len(prompts)  # type: ignore[list-item]

        async def run(i: int) -> None:
            timings[i] = await one_request(client, url, model, prompts[i], max_tokens, stream)

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(run, i)
        return timings


def _client_process(url: str, prompts: list[list[int]], max_tokens: int, stream: bool,
                    ready: Any, go: Any, results: Any) -> None:
    ready.wait()  # every client process is up: start together
    go.wait()
    timings = anyio.run(drive_mesh, url, prompts, max_tokens, stream)
    results.put([(t.start, t.chunks, t.output_tokens, t.end) for t in timings])


def drive_clients(url: str, prompts: list[list[int]], max_tokens: int, stream: bool,
                  processes: int) -> tuple[list[RequestTiming], float]:
    """All ``prompts`` at once from ``processes`` client processes (one Python HTTP
    client parses a few thousand responses or SSE events a second: at 256 streams it,
    not the server, would set the pace). Times are ``time.perf_counter`` (the
    system's monotonic clock, the same in every process and in the step log)."""
    if processes <= 1:
        start = time.perf_counter()
        timings = anyio.run(drive_mesh, url, prompts, max_tokens, stream)
    else:
        context = multiprocessing.get_context("fork")
        ready, go = context.Barrier(processes + 1), context.Event()
        results = context.Queue()
        children = [
            context.Process(target=_client_process, daemon=True, args=(
                url, prompts[i::processes], max_tokens, stream, ready, go, results))
            for i in range(processes)
        ]
        for child in children:
            child.start()
        ready.wait()
        start = time.perf_counter()
        go.set()
        timings = [RequestTiming(start=a, chunks=c, output_tokens=n, end=e)
                   for _ in children for a, c, n, e in results.get()]
        for child in children:
            child.join()
    end = max(t.end for t in timings)
    print(f"    client window (monotonic): {start:.3f} .. {end:.3f}")
    return timings, end - start


def summarize(name: str, timings: list[RequestTiming], wall: float) -> dict[str, float]:
    tokens = sum(t.output_tokens for t in timings)
    row = {"output_tokens": tokens, "wall_s": wall, "throughput_tok_s": tokens / wall,
           "e2e_p50_ms": 1000 * percentile([t.end - t.start for t in timings], 50)}
    ttft = [t.chunks[0] - t.start for t in timings if t.chunks]
    if ttft:
        itl = [b - a for t in timings for a, b in itertools.pairwise(t.chunks)]
        tpot = [(t.end - t.chunks[0]) / (t.output_tokens - 1) for t in timings
                if t.chunks and t.output_tokens > 1]
        # Percentiles as bench.serve (and vLLM) compute them, so the two tools agree.
        row |= {
            "ttft_p50_ms": 1000 * percentile(ttft, 50),
            "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "tpot_p50_ms": 1000 * percentile(tpot, 50),
        }
        if itl:
            row |= {"itl_p50_ms": 1000 * percentile(itl, 50),
                    "itl_p99_ms": 1000 * percentile(itl, 99)}
    print(f"{name:>18}: " + "  ".join(f"{k}={v:.2f}" for k, v in row.items()))
    return row


def run_in_process(model: str, prompts: list[list[int]], warmup: list[list[int]],
                   max_tokens: int, torch_threads: int, device: str,
                   settings: dict[str, str]) -> tuple[list[RequestTiming], float]:
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    # The in-process engine computes what the mesh's workers do: same number formats.
    runner = ModelRunner(resolve_model_dir(model), device=device,
                         quantization=settings.get("quantization", ""),
                         kv_cache_dtype=settings.get("kv_cache_dtype", "auto"))
    engine = InProcessEngine(runner)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(warmup, sampling)  # warm-up, as for the mesh
    start = time.perf_counter()
    completions = engine.generate(prompts, sampling)
    wall = time.perf_counter() - start
    timings = [
        RequestTiming(start=start, chunks=[c.first_token_at or start], end=c.finished_at or start,
                      output_tokens=len(c.token_ids))
        for c in completions
    ]
    return timings, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default="", help="HF folder (default: embedded model)")
    parser.add_argument("--url", default="", help="an already running mesh")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (both sides)")
    parser.add_argument("--mesh-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a mesh setting (meshserve up --set), e.g. steps_in_flight=3")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="HTTP client processes sharing the requests (one Python client "
                             "can be slower than the server it measures)")
    parser.add_argument("--result-json", default="",
                        help="also write the figures, the GPU and this command line here")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads of the worker and of the in-process run (0: torch's)")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    # Three prompt sets (measured, warm-up, streamed), so that no run finds another's
    # prompts in the prefix cache.
    prompts, warmup, streamed = (
        [[rng.randrange(FIRST_ORDINARY_TOKEN, vocab) for _ in range(args.prompt_len)]
         for _ in range(args.requests)]
        for _ in range(3)
    )
    print(f"{args.requests} concurrent requests, prompt {args.prompt_len} tokens, "
          f"{args.max_tokens} output tokens each, model {model_dir.name}")

    streamed_rows: list[dict[str, float]] = []

    def drive(url: str) -> dict[str, float]:
        # A discarded warm-up of the whole workload first, on both sides: first-call
        # costs (allocator growth, CUDA kernels for each new batch shape) are not load.
        # Its prompts differ from the measured ones, so no prefix cache hit carries over.
        drive_clients(url, warmup, args.max_tokens, False, args.client_processes)
        # Throughput without streaming: a streaming client parsing 32 SSE streams
        # on this same machine would take CPU from the mesh that in-process never
        # pays. Latencies (TTFT, TPOT, ITL) come from a second, streamed run.
        timings, wall = drive_clients(url, prompts, args.max_tokens, False,
                                      args.client_processes)
        row = summarize("mesh", timings, wall)
        timings, wall = drive_clients(url, streamed, args.max_tokens, True,
                                      args.client_processes)
        streamed_rows.append(summarize("mesh (streamed)", timings, wall))
        return row

    if args.url:
        mesh = drive(args.url)
    else:
        mesh_args = ["--device", args.device, "--tts", "0",
                     "--set", f"torch_threads={args.torch_threads}"]
        for setting in args.mesh_set:
            mesh_args += ["--set", setting]
        with started_mesh(args.model, mesh_args) as url:
            mesh = drive(url)
    settings = dict(setting.partition("=")[::2] for setting in args.mesh_set)
    local_timings, local_wall = run_in_process(args.model, prompts, warmup, args.max_tokens,
                                               args.torch_threads, args.device, settings)
    local = summarize("in-process", local_timings, local_wall)
    ratio = mesh["throughput_tok_s"] / local["throughput_tok_s"]
    print(f"throughput ratio mesh / in-process: {ratio:.3f}")
    if args.result_json:
        write_result(Path(args.result_json), {
            "benchmark": "bench.mesh_bench", "command": shlex.join(["python", "-m",
                                                                   "bench.mesh_bench",
                                                                   *sys.argv[1:]]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "gpu": gpu_name(),
            "model": model_dir.name, "requests": args.requests, "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens, "client_processes": args.client_processes,
            "mesh": mesh,
            "mesh_streamed": streamed_rows[0] if streamed_rows else None, "in_process": local,
            "ratio_mesh_over_in_process": ratio,
        })


def write_result(path: Path, result: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
