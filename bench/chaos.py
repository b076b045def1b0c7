"""Chaos under load: SIGKILL one service while streams run, and print what it cost.

    .venv/bin/python -m bench.chaos [--streams 16] [--max-tokens 400] [--kill-after 1.5]
                                    [--services tokenizer,worker,kvcache,scheduler,api]
                                    [--services worker:stop,worker:hang]

Starts a mesh (`meshserve up` on the embedded model, 2 workers, 2 tokenizers, no
tts, its own run dir, port and process group), runs one undisturbed round for the
reference texts, then one round per service: ``--streams`` streamed greedy
completions of ``--max-tokens`` tokens at once, and SIGKILL of one replica of that
service once every stream has shown text and ``--kill-after`` seconds have passed
(so the kill always lands mid-stream). Prints, per killed service:

    killed | completed | failed (cleanly) | hung | text differs | failed streams
    ended after | serving again after | KV blocks leaked

- completed: the stream ended with a finish reason and no error; "text differs"
  counts the completed ones whose text is not the undisturbed run's.
- failed (cleanly): an error status, an SSE error event, or a connection the
  server closed (the api itself was killed); "ended after" is the latest such end,
  in seconds after the kill.
- hung: nothing arrived for ``--stall-s`` seconds.
- serving again after: from the kill until the supervisor reports a new process
  for the killed replica, every replica of its service healthy, and a fresh
  one-token completion answers 200.
- KV blocks leaked: once the round's streams ended, blocks still in use or
  requests still held in any pool (`meshserve kv stats`).

The mesh is stopped (SIGTERM to its process group, SIGKILL after a deadline)
however the script ends. ``tests/e2e/test_chaos.py`` drives the same rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from services.supervisor.control import ControlClient
from shared.protocol.control import MeshStatus, StatusRequest

SERVICES = ("tokenizer", "worker", "kvcache", "scheduler", "api")
MODEL = "meshserve-tiny-llama"
STARTUP_DEADLINE_S = 240.0
STOP_DEADLINE_S = 60.0
BACK_DEADLINE_S = 60.0  # longer than this and the replica counts as not back


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ChaosMesh:
    """`meshserve up` in its own process group and run dir; ``stop`` ends it all."""

    def __init__(self, args: Sequence[str], log_path: Path | None = None) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="ms-chaos-", dir="/tmp"))
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or self.run_dir.with_suffix(".log")
        env = {k: v for k, v in os.environ.items() if k != "MESHSERVE_RUN_DIR"}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._env = env
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.supervisor", "up", "--run-dir",
                 str(self.run_dir), "--port", str(self.port), *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        # Made on first use: `up` creates the mesh's keys as it starts, and the
        # client reads them.
        self._control: ControlClient | None = None

    def status(self) -> MeshStatus:
        if self._control is None:
            self._control = ControlClient(self.run_dir)
        answer = self._control.request(StatusRequest(), timeout_s=10)
        assert isinstance(answer, MeshStatus), answer
        return answer

    def pid_of(self, service: str, replica: int = 0) -> int | None:
        for child in self.status().children:
            if child.service == service and child.replica == replica:
                return child.pid
        return None

    def wait_healthy(self, deadline_s: float = STARTUP_DEADLINE_S) -> None:
        """Until /health is 200 and every child is healthy (polled, with a deadline:
        no event crosses the process boundary)."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"meshserve up exited ({self.process.returncode}); "
                                   f"see {self.log_path}")
            with contextlib.suppress(httpx.TransportError, OSError, TimeoutError):
                if (httpx.get(self.base_url + "/health", timeout=5).status_code == 200
                        and self.status().healthy):
                    return
            time.sleep(0.2)
        raise TimeoutError(f"mesh not healthy within {deadline_s:g} s; see {self.log_path}")

    def kv_stats(self) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "services.supervisor", "kv", "stats", "--json",
             "--run-dir", str(self.run_dir)],
            capture_output=True, text=True, timeout=120, env=self._env, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"meshserve kv stats failed: {done.stderr.strip()}")
        stats: dict[str, Any] = json.loads(done.stdout)
        return stats

    def stop(self) -> int | None:
        """SIGTERM the supervisor's group; SIGKILL it after a deadline. Idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Children have their own groups but die with the supervisor (PDEATHSIG).
        with contextlib.suppress(OSError):
            for path in self.run_dir.iterdir():
                path.unlink()
            self.run_dir.rmdir()
        return self.process.returncode


@contextlib.contextmanager
def started_mesh(
    *, workers: int = 2, tokenizers: int = 2, extra: Sequence[str] = (),
    log_path: Path | None = None,
) -> Iterator[ChaosMesh]:
    mesh = ChaosMesh(["--workers", str(workers), "--tokenizers", str(tokenizers),
                      "--tts", "0", *extra], log_path)
    try:
        mesh.wait_healthy()
        yield mesh
    finally:
        mesh.stop()


# --------------------------------------------------------------------- streams

@dataclass(slots=True)
class StreamResult:
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    hung: bool = False
    first_text_at: float | None = None
    ended_at: float | None = None

    @property
    def completed(self) -> bool:
        return self.finish_reason is not None and self.error is None and not self.hung

    @property
    def failed(self) -> bool:
        return not self.completed and not self.hung


def prompts(count: int) -> list[str]:
    """Distinct prompts, so that each stream's text is its own."""
    return [f"Stream {i} of the chaos test: the mesh keeps every request alive while"
            for i in range(count)]


async def stream_completion(
    client: httpx.AsyncClient, base_url: str, prompt: str, max_tokens: int,
    result: StreamResult, stall_s: float,
) -> None:
    """One streamed greedy completion of exactly ``max_tokens`` tokens into ``result``."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    try:
        with anyio.fail_after(stall_s * 4 + max_tokens):  # a last resort, never expected
            async with client.stream("POST", base_url + "/v1/completions", json=body,
                                     timeout=httpx.Timeout(30, read=stall_s)) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {(await response.aread())!r}"
                    return
                async for line in response.aiter_lines():
                    _take_line(line, result)
        if result.finish_reason is None and result.error is None:
            result.error = "stream ended without a finish reason"
    except httpx.ReadTimeout:
        result.hung = True
    except TimeoutError:
        result.hung = True
    except httpx.TransportError as e:
        # The server closed the connection (the api died): a clean failure.
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.ended_at = time.monotonic()


def _take_line(line: str, result: StreamResult) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    chunk = json.loads(line[len("data: "):])
    if "error" in chunk:
        result.error = str(chunk["error"].get("message"))
        return
    for choice in chunk.get("choices", []):
        if choice.get("text"):
            result.text += choice["text"]
            if result.first_text_at is None:
                result.first_text_at = time.monotonic()
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]


# ---------------------------------------------------------------------- rounds

@dataclass(slots=True)
class RoundReport:
    killed: str
    results: list[StreamResult]
    running_at_kill: int = 0
    killed_at: float | None = None
    back_after_s: float | None = None
    differs: int = 0
    leaked_blocks: int = 0
    leaked_requests: int = 0
    drained_after_s: float | None = None  # from the fault until no pool held a request
    kv_pools: list[dict[str, Any]] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return sum(r.completed for r in self.results)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.results)

    @property
    def hung(self) -> int:
        return sum(r.hung for r in self.results)

    @property
    def failed_ended_after_s(self) -> float | None:
        ends = [r.ended_at for r in self.results if r.failed and r.ended_at is not None]
        if not ends or self.killed_at is None:
            return None
        return max(ends) - self.killed_at


@dataclass(frozen=True, slots=True)
class Fault:
    """What a round does to ``service`` mid-stream: ``signal`` to its replica 0
    (SIGKILL, or SIGSTOP: a process that stops answering), or, with
    ``stall_file``, create that file so the next step of some worker never
    completes (the worker's ``fault_stall_file``)."""

    service: str
    signal: int = signal.SIGKILL
    stall_file: Path | None = None

    @property
    def name(self) -> str:
        if self.stall_file is not None:
            return f"{self.service} (hung step)"
        if self.signal == signal.SIGKILL:
            return self.service
        return f"{self.service} ({signal.Signals(self.signal).name})"

    def inflict(self, pids: dict[int, int | None]) -> None:
        if self.stall_file is not None:
            self.stall_file.touch()
            return
        pid = pids.get(0)
        assert pid is not None, f"no {self.service} replica 0 is running"
        os.kill(pid, self.signal)


def _replica_pids(mesh: ChaosMesh, service: str) -> dict[int, int | None]:
    return {c.replica: c.pid for c in mesh.status().children if c.service == service}


async def _wait_back(mesh: ChaosMesh, client: httpx.AsyncClient, service: str,
                     before: dict[int, int | None], faulted_at: float) -> float | None:
    """Seconds from the fault until a new process replaced one of ``service``'s
    replicas, every replica is healthy, and a completion answers 200."""
    deadline = faulted_at + BACK_DEADLINE_S
    while time.monotonic() < deadline:
        status = await anyio.to_thread.run_sync(mesh.status)
        children = [c for c in status.children if c.service == service]
        replaced = any(c.pid not in (None, before.get(c.replica)) for c in children)
        if replaced and all(c.healthy for c in children):
            with contextlib.suppress(httpx.TransportError):
                reply = await client.post(
                    mesh.base_url + "/v1/completions", timeout=30,
                    json={"model": MODEL, "prompt": "back?", "max_tokens": 1,
                          "temperature": 0})
                if reply.status_code == 200:
                    return time.monotonic() - faulted_at
        await anyio.sleep(0.1)  # polling: the supervisor's state is in another process
    return None


async def run_round(
    mesh: ChaosMesh, texts: Sequence[str], max_tokens: int, *, fault: Fault | None,
    kill_after_s: float = 1.5, stall_s: float = 30.0,
) -> RoundReport:
    """``len(texts)`` streams at once; with a ``fault``, inflict it mid-stream (every
    stream has shown text and ``kill_after_s`` passed) and time the service's return."""
    results = [StreamResult() for _ in texts]
    report = RoundReport(fault.name if fault else "(none)", results)
    limits = httpx.Limits(max_connections=len(texts) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client, anyio.create_task_group() as tg:
        started = time.monotonic()
        for prompt, result in zip(texts, results, strict=True):
            tg.start_soon(stream_completion, client, mesh.base_url, prompt, max_tokens,
                          result, stall_s)
        if fault is None:
            return report
        while (time.monotonic() - started < kill_after_s
               or any(r.first_text_at is None and r.ended_at is None for r in results)):
            await anyio.sleep(0.02)
        before = await anyio.to_thread.run_sync(_replica_pids, mesh, fault.service)
        report.running_at_kill = sum(r.ended_at is None for r in results)
        fault.inflict(before)
        report.killed_at = time.monotonic()
        report.back_after_s = await _wait_back(mesh, client, fault.service, before,
                                               report.killed_at)
    return report


def check_texts(report: RoundReport, reference: Sequence[str]) -> None:
    report.differs = sum(r.completed and r.text != ref
                         for r, ref in zip(report.results, reference, strict=True))


def check_kv(mesh: ChaosMesh, report: RoundReport, deadline_s: float = 30.0) -> None:
    """Blocks or requests still held once every stream ended: leaks. Aborts and
    frees reach the KV manager with the next sync, so this waits a moment for them."""
    deadline = time.monotonic() + deadline_s
    while True:
        pools = mesh.kv_stats()["pools"]
        report.kv_pools = pools
        report.leaked_blocks = sum(p["used_blocks"] for p in pools)
        report.leaked_requests = sum(p["requests"] for p in pools)
        if report.leaked_blocks == 0 and report.leaked_requests == 0:
            if report.killed_at is not None:
                report.drained_after_s = time.monotonic() - report.killed_at
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)


def format_table(reports: Sequence[RoundReport]) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    head = ("killed", "streams completed", "failed (cleanly)", "hung", "text differs",
            "failed streams ended after", "serving again after", "KV blocks leaked")
    rows = [head, tuple("---" for _ in head)]
    for r in reports:
        back = seconds(r.back_after_s) if r.killed_at is not None else "-"
        if r.killed_at is not None and r.back_after_s is None:
            back = f"not within {BACK_DEADLINE_S:g} s"
        rows.append((r.killed, str(r.completed), str(r.failed), str(r.hung), str(r.differs),
                     seconds(r.failed_ended_after_s), back, str(r.leaked_blocks)))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


# ------------------------------------------------------------------------ main

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos",
                                description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--kill-after", type=float, default=1.5, help="seconds, at least")
    p.add_argument("--stall-s", type=float, default=30.0, help="no data this long: hung")
    p.add_argument("--services", default=",".join(SERVICES),
                   help="rounds, in order: SERVICE (SIGKILL), or worker:stop (SIGSTOP) "
                        "or worker:hang (a step that never completes)")
    p.add_argument("--step-timeout", type=float, default=5.0,
                   help="the supervisor's step_timeout_s, when a round hangs a step")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to `meshserve up`")
    return p.parse_args(argv)


def parse_fault(entry: str, stall_file: Path) -> Fault:
    service, _, how = entry.partition(":")
    if how == "stop":
        return Fault(service, signal.SIGSTOP)
    if how == "hang":
        return Fault(service, stall_file=stall_file)
    if how:
        raise SystemExit(f"--services: unknown fault {how!r} in {entry!r} (stop, hang)")
    return Fault(service)


async def chaos(mesh: ChaosMesh, args: argparse.Namespace,
                stall_file: Path) -> list[RoundReport]:
    texts = prompts(args.streams)
    baseline = await run_round(mesh, texts, args.max_tokens, fault=None, stall_s=args.stall_s)
    if baseline.completed != len(texts):
        raise RuntimeError(f"the undisturbed round failed: "
                           f"{[r.error for r in baseline.results if not r.completed]}")
    reference = [r.text for r in baseline.results]
    reports = [baseline]
    for entry in args.services.split(","):
        report = await run_round(mesh, texts, args.max_tokens,
                                 fault=parse_fault(entry, stall_file),
                                 kill_after_s=args.kill_after, stall_s=args.stall_s)
        check_texts(report, reference)
        await anyio.to_thread.run_sync(mesh.wait_healthy)
        await anyio.to_thread.run_sync(check_kv, mesh, report)
        print(format_table([report]).splitlines()[-1], flush=True)
        reports.append(report)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    extra = [item for kv in args.set for item in ("--set", kv)]
    stall_file = Path(tempfile.gettempdir()) / f"ms-chaos-stall-{os.getpid()}"
    if ":hang" in args.services:
        extra += ["--set", f"fault_stall_file={stall_file}",
                  "--set", f"step_timeout_s={args.step_timeout}"]
    try:
        with started_mesh(workers=args.workers, tokenizers=args.tokenizers,
                          extra=extra) as mesh:
            print(f"mesh up at {mesh.base_url}, log {mesh.log_path}", flush=True)
            reports = anyio.run(chaos, mesh, args, stall_file)
    finally:
        stall_file.unlink(missing_ok=True)
    print(f"\n{args.streams} streamed greedy completions of {args.max_tokens} tokens, "
          f"the fault at >= {args.kill_after:g} s, once every stream had text:\n")
    print(format_table(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
