"""Speech benchmark: time to first audio and real-time factor under concurrency.

    python bench/tts_bench.py                      # starts its own api + tts replica
    python bench/tts_bench.py --url http://127.0.0.1:8000   # against a running mesh

For each concurrency level (default 1, 16, 64) it keeps that many streaming
``POST /v1/audio/speech`` requests in flight (``pcm``, so the first body bytes are
audio) and reports, per request: time to first audio chunk (TTFA, from sending the
request to the first audio bytes) and real-time factor (RTF, wall time of the request
divided by the duration of the audio it returned; below 1 is faster than real time).
The last column is the aggregate: seconds of audio produced per wall second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from shutil import rmtree

import anyio
import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 24000
PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. Speech is synthesized one sentence at "
    "a time, so the first words can play while the rest is still being made. "
)


@dataclass(frozen=True, slots=True)
class Sample:
    ttfa_s: float
    wall_s: float
    audio_s: float

    @property
    def rtf(self) -> float:
        return self.wall_s / self.audio_s


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def local_mesh(replicas: int, engines: int, max_queued: int) -> Iterator[str]:
    """The api and ``replicas`` tts replicas as subprocesses; yields the URL.

    The api is the real one (``python -m services.api``): its speech side serves on
    its own, the text side's tokenizer and scheduler are not started."""
    ipc_dir = Path(tempfile.mkdtemp(prefix="ms-bench-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHSERVE_", "OTEL_"))}
    env.update(
        MESHSERVE_SPEECH_ADDR=f"ipc://{ipc_dir}/speech.sock",
        # The api also binds for tokenizers and dials the scheduler (none here).
        MESHSERVE_API_ADDR=f"ipc://{ipc_dir}/api.sock",
        MESHSERVE_SCHEDULER_ADDR=f"ipc://{ipc_dir}/scheduler.sock",
        MESHSERVE_PORT="0",
        MESHSERVE_ENGINES=str(engines),
        MESHSERVE_MAX_QUEUED_REQUESTS=str(max_queued),
        MESHSERVE_LOG_LEVEL="warning",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    with ExitStack() as stack:
        stack.callback(rmtree, ipc_dir, ignore_errors=True)
        api = subprocess.Popen(
            [sys.executable, "-m", "services.api"],
            env=env | {"MESHSERVE_LOG_LEVEL": "info"},
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port: list[int] = []
        ready: set[str] = set()
        seen = threading.Condition()

        def follow() -> None:
            assert api.stdout is not None
            for raw in api.stdout:  # read to EOF, so the api never blocks on its stdout
                with suppress(ValueError), seen:
                    line = json.loads(raw)
                    if line.get("event") == "http listening":
                        port.append(int(line["port"]))
                    if line.get("event") == "tts replica ready":
                        ready.add(str(line["replica"]))
                    seen.notify_all()

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        stack.callback(reader.join, 10)
        stack.callback(_stop, api)
        for replica in range(replicas):
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.tts"],
                env=env | {"MESHSERVE_REPLICA": str(replica)},
                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            stack.callback(_stop, proc)
        with seen:
            if not seen.wait_for(lambda: port and len(ready) == replicas, timeout=120):
                raise SystemExit("the speech mesh did not come up within 120 s")
        yield f"http://127.0.0.1:{port[0]}"


async def one_request(client: httpx.AsyncClient, url: str, text: str, voice: str) -> Sample:
    body = {"model": "tts-1", "voice": voice, "input": text, "response_format": "pcm",
            "sample_rate": SAMPLE_RATE}
    started = time.perf_counter()
    first: float | None = None
    size = 0
    async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status_code}: {detail}")
        async for chunk in response.aiter_bytes():
            if chunk and first is None:
                first = time.perf_counter() - started
            size += len(chunk)
    wall = time.perf_counter() - started
    assert first is not None, "no audio"
    return Sample(first, wall, size / 2 / SAMPLE_RATE)


async def run_level(url: str, concurrency: int, requests: int, text: str,
                    voice: str) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    queue = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()

        async def worker() -> None:
            for _ in queue:
                samples.append(await one_request(client, url, text, voice))

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        elapsed = time.perf_counter() - started
    return samples, elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(url: str, levels: list[int], rounds: int, text: str, voice: str) -> None:
    await run_level(url, 1, 2, text, voice)  # warm up engines and connections
    print(f"input: {len(text)} characters; {rounds} request(s) per concurrent slot\n")
    print(f"{'conc':>5} {'reqs':>5} {'TTFA p50':>10} {'TTFA p90':>10} {'TTFA max':>10} "
          f"{'RTF p50':>9} {'RTF p90':>9} {'audio s':>9} {'audio s/s':>10}")
    for concurrency in levels:
        samples, elapsed = await run_level(url, concurrency, concurrency * rounds, text, voice)
        ttfa = [s.ttfa_s * 1000 for s in samples]
        rtf = [s.rtf for s in samples]
        audio = sum(s.audio_s for s in samples)
        print(f"{concurrency:>5} {len(samples):>5} {statistics.median(ttfa):>8.1f}ms "
              f"{percentile(ttfa, 0.9):>8.1f}ms {max(ttfa):>8.1f}ms "
              f"{statistics.median(rtf):>9.4f} {percentile(rtf, 0.9):>9.4f} "
              f"{audio:>9.1f} {audio / elapsed:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running api (default: start a local speech mesh)")
    parser.add_argument("--levels", default="1,16,64", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2, help="requests per concurrent slot")
    parser.add_argument("--chars", type=int, default=600, help="input length per request")
    parser.add_argument("--voice", default="alloy")
    parser.add_argument("--replicas", type=int, default=1, help="local mesh: tts replicas")
    parser.add_argument("--engines", type=int, default=2, help="local mesh: engines/replica")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    text = (PARAGRAPH * (args.chars // len(PARAGRAPH) + 1))[: args.chars].rsplit(" ", 1)[0]
    with ExitStack() as stack:
        url = args.url or stack.enter_context(
            local_mesh(args.replicas, args.engines, max_queued=max(levels))
        )
        anyio.run(bench, url, levels, args.rounds, text, args.voice)


if __name__ == "__main__":
    main()
