"""Shutdown drains and overload is answered, on the whole mesh (`meshserve up` in the
foreground, the embedded model, real HTTP clients):

- SIGTERM to the supervisor during 16 streams: every stream finishes with its full
  text, a request made meanwhile gets 503 with Retry-After, /health/ready turns 503
  while /health/live stays 200, and the mesh exits 0 leaving no process and no
  socket file.
- Twice the queue capacity at once, half of it streamed: the excess gets 429 with
  Retry-After (a refused stream too, not a 200 with an error event), every
  request ends, and every service's RSS stays under a stated bound.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.supervisor.run_dir import wait_for_exit
from tests.e2e.mesh import STOP_DEADLINE_S, Mesh, start_mesh

pytestmark = pytest.mark.slow

MODEL = "meshserve-tiny-llama"
PROMPTS = ["The mesh", "def main():", "Once upon a time", "import os\n"]
STREAMS = 16
# Long enough that the drain is still under way when the test probes it: on this
# 2-core machine 16 streams of this length take many seconds.
STREAM_TOKENS = 160
REQUEST_TIMEOUT_S = 300.0
# Long enough that no request of the burst ends before the last one arrives.
OVERLOAD_TOKENS = 400
# Per service process, VmRSS. Measured on the 2-core CI machine at the peak of the
# overload below: api 45 MB, tokenizer 48 MB, scheduler 37 MB, kvcache 37 MB, worker
# (torch, the embedded model) 540 MB. The bounds are about 5x and 2x that: a leak
# proportional to the requests, or an unbounded queue, would pass them.
RSS_BOUND_KB = {"worker": 1024 * 1024}
RSS_BOUND_OTHERS_KB = 256 * 1024


def completion(mesh: Mesh, prompt: str, max_tokens: int) -> httpx.Response:
    return httpx.post(mesh.base_url + "/v1/completions", timeout=REQUEST_TIMEOUT_S, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})


def streamed_completion(mesh: Mesh, prompt: str, max_tokens: int) -> httpx.Response:
    """A streamed completion, read to its end; its usage is in the last event."""
    with httpx.stream("POST", mesh.base_url + "/v1/completions", timeout=REQUEST_TIMEOUT_S,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        response.read()
    return response


def sse_payloads(body: str) -> list[Any]:
    return [json.loads(line.removeprefix("data: ")) for line in body.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def stream_text(mesh: Mesh, prompt: str, started: threading.Barrier) -> tuple[str, str | None]:
    """One streamed completion; (its text, its finish reason). Waits at ``started``
    once its first chunk arrived, so the test knows every stream is in flight."""
    text, finish = [], None
    with httpx.stream("POST", mesh.base_url + "/v1/completions", timeout=REQUEST_TIMEOUT_S,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": STREAM_TOKENS,
                            "temperature": 0, "ignore_eos": True, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        waited = False
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = httpx.Response(200, content=line.removeprefix("data: ")).json()
            assert "error" not in payload, payload
            for choice in payload["choices"]:
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
            if not waited:
                waited = True
                started.wait(timeout=REQUEST_TIMEOUT_S)
    return "".join(text), finish


def process_groups(pgids: set[int]) -> list[int]:
    """Pids of every live process whose process group is one of ``pgids``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) in pgids:
            found.append(int(entry.name))
    return found


def get(mesh: Mesh, path: str) -> httpx.Response:
    return httpx.get(mesh.base_url + path, timeout=30)


def test_sigterm_drains_every_stream_then_the_mesh_exits(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path, extra_args=("--tts", "0", "--shutdown-timeout", "240"))
    try:
        assert get(mesh, "/health/ready").status_code == 200
        assert get(mesh, "/health/live").status_code == 200
        # What each prompt's stream must say: greedy is the same at any concurrency.
        expected = {}
        for prompt in PROMPTS:
            reply = completion(mesh, prompt, STREAM_TOKENS)
            assert reply.status_code == 200, (reply.text, mesh.logs())
            expected[prompt] = reply.json()["choices"][0]["text"]
        children = mesh.status()["children"]
        pgids = {mesh.process.pid, *(c["pid"] for c in children)}

        started = threading.Barrier(STREAMS + 1)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(STREAMS)]
        with ThreadPoolExecutor(STREAMS) as pool:
            streams = [pool.submit(stream_text, mesh, p, started) for p in prompts]
            started.wait(timeout=REQUEST_TIMEOUT_S)  # all 16 are streaming
            os.kill(mesh.process.pid, signal.SIGTERM)

            # While it drains: new work is refused, readiness is off, liveness on.
            deadline = time.monotonic() + 30
            while get(mesh, "/health/ready").status_code == 200:
                assert time.monotonic() < deadline, "the api never reported draining"
                time.sleep(0.05)  # polling with a deadline: no cross-process event
            refused = completion(mesh, "too late", 4)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "shutting_down"
            assert int(refused.headers["retry-after"]) >= 1
            assert get(mesh, "/health/live").status_code == 200
            assert not all(s.done() for s in streams), "the streams ended before the probes"

            results = [s.result(timeout=REQUEST_TIMEOUT_S) for s in streams]
        for prompt, (text, finish) in zip(prompts, results, strict=True):
            assert finish == "length"
            assert text == expected[prompt]

        assert mesh.process.wait(STOP_DEADLINE_S + 240) == 0, mesh.logs()
        for child in children:
            assert wait_for_exit(child["pid"], 10)
        assert process_groups(pgids) == []
        leftovers = sorted(p.name for p in mesh.run_dir.iterdir()) if mesh.run_dir.exists() \
            else []
        assert not [name for name in leftovers if name.endswith(".sock") or name.endswith(
            ".pid")], leftovers
        log = mesh.logs(400)
        assert "drain deadline passed" not in log
    finally:
        mesh.stop()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_twice_the_queue_capacity_gets_429_and_memory_stays_bounded(tmp_path: Path) -> None:
    # Capacity: 2 running + 4 waiting. 12 long requests at once, every other one
    # streamed: a refused stream is a 429 as well, not a 200 with an error event.
    capacity = 6
    mesh = start_mesh(tmp_path, extra_args=(
        "--tts", "0", "--set", "max_waiting=4", "--set", "max_num_seqs=2"))
    try:
        children: list[dict[str, Any]] = mesh.status()["children"]
        peak: dict[str, int] = {c["service"]: rss_kb(c["pid"]) for c in children}
        go = threading.Barrier(2 * capacity)

        def request(i: int) -> httpx.Response:
            go.wait(timeout=60)
            send = streamed_completion if i % 2 else completion
            return send(mesh, PROMPTS[i % len(PROMPTS)], OVERLOAD_TOKENS)

        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):  # a sampling period, not an ordering
                for c in children:
                    peak[c["service"]] = max(peak[c["service"]], rss_kb(c["pid"]))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(2 * capacity) as pool:
                replies = list(pool.map(request, range(2 * capacity)))
        finally:
            done.set()
            sampler.join()

        statuses = sorted(r.status_code for r in replies)
        busy = [r for r in replies if r.status_code == 429]
        assert set(statuses) <= {200, 429}, [r.text for r in replies]
        assert busy, f"nobody was refused: {statuses}"
        assert len(busy) <= capacity  # the queue took what it holds
        for reply in busy:
            assert reply.headers["retry-after"] == "1"
            error = reply.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "server_busy"
        for i, reply in enumerate(replies):
            if reply.status_code != 200:
                continue
            if i % 2:
                assert reply.headers["content-type"].startswith("text/event-stream")
                events = sse_payloads(reply.text)
                assert not [e for e in events if "error" in e], reply.text[-500:]
                assert events[-1]["usage"]["completion_tokens"] == OVERLOAD_TOKENS
            else:
                assert reply.json()["usage"]["completion_tokens"] == OVERLOAD_TOKENS
        streamed_busy = sum(1 for i, r in enumerate(replies) if i % 2 and r.status_code == 429)
        for c in children:
            peak[c["service"]] = max(peak[c["service"]], rss_kb(c["pid"]))
        print("peak RSS kB:", peak, "statuses:", statuses, "streamed 429s:", streamed_busy)
        over = {service: kb for service, kb in peak.items()
                if kb > RSS_BOUND_KB.get(service, RSS_BOUND_OTHERS_KB)}
        assert not over, f"RSS over its bound: {over} (all: {peak})"
        # The mesh still serves once the burst is over.
        assert completion(mesh, "The mesh", 4).status_code == 200
    finally:
        mesh.stop()
