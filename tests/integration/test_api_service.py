"""The api service as a real subprocess, driven over HTTP (httpx and the unmodified
``openai`` client) while the test plays its mesh peers over real ipc sockets:
tokenizer replicas (DEALERs at the api's address) and the scheduler (a ROUTER at
the scheduler address that reports one worker every heartbeat)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import openai
import pytest
import zmq
import zmq.asyncio
from anyio.abc import Process, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from shared.mesh import (
    DealerEndpoint,
    Identity,
    PeerJoined,
    Received,
    RouterEndpoint,
    UpstreamJoined,
)
from shared.protocol.common import Rejected
from shared.protocol.envelope import unpack_i32
from shared.protocol.generation import (
    Abort,
    GenerateRequest,
    RequestFailed,
    SchedulerStatus,
    TextBatch,
    TextDelta,
)
from tests.otlp import attributes_of, otlp_receiver

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 0.2
SERVED = "meshserve-tiny-llama"
WAIT_S = 20.0  # generous: the machine is shared and slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Inbox:
    """A typed, bounded queue the fakes sort received messages into."""

    def __init__(self) -> None:
        send, receive = anyio.create_memory_object_stream[Any](256)
        self._send: MemoryObjectSendStream[Any] = send
        self._receive: MemoryObjectReceiveStream[Any] = receive

    def put(self, item: Any) -> None:
        self._send.send_nowait(item)

    async def get(self, timeout: float = WAIT_S) -> Any:
        with anyio.fail_after(timeout):
            return await self._receive.receive()

    def empty(self) -> bool:
        return self._receive.statistics().current_buffer_used == 0


class FakeTokenizer:
    """Plays tokenizer replica ``replica``: records what the api sends it and
    answers as the test says."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, replica: int) -> None:
        self.endpoint: DealerEndpoint[GenerateRequest | Abort] = DealerEndpoint(
            ctx, address, Identity("tokenizer", replica), GenerateRequest | Abort,
            heartbeat_s=HEARTBEAT_S,
        )
        self.generate = Inbox()
        self.aborts = Inbox()
        self.rejected = Inbox()
        self.welcomed = anyio.Event()
        self.scope = anyio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            async with anyio.create_task_group() as tg:
                await tg.start(self.endpoint.run)
                async for event in self.endpoint.inbox:
                    if isinstance(event, UpstreamJoined):
                        self.welcomed.set()
                    elif isinstance(event, Received):
                        if isinstance(event.body, GenerateRequest):
                            self.generate.put(event)
                        elif isinstance(event.body, Abort):
                            self.aborts.put(event)
                        elif isinstance(event.body, Rejected):
                            self.rejected.put(event)
        self.endpoint.close()

    def kill(self) -> None:
        """The replica dies: no more heartbeats, no goodbye."""
        self.scope.cancel()

    async def text(
        self,
        request_id: str,
        text: str,
        offset: int,
        *,
        completion_tokens: int,
        finish: str | None = None,
        prompt_tokens: int = 3,
    ) -> None:
        delta = TextDelta(request_id, text, offset, prompt_tokens, completion_tokens, finish)
        await self.endpoint.send(TextBatch([delta]))

    async def answer(self, request_id: str, pieces: list[str], finish: str = "stop") -> None:
        """Send ``pieces`` as consecutive deltas, one token each, then finish."""
        offset = 0
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            await self.text(request_id, piece, offset, completion_tokens=i + 1,
                            finish=finish if last else None)
            offset += len(piece)


class FakeScheduler:
    """Plays the scheduler: answers the api's hello with a SchedulerStatus and
    re-sends it every heartbeat (as the real one does); records Aborts."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, workers: int = 1) -> None:
        self.endpoint: RouterEndpoint[Abort] = RouterEndpoint(
            ctx, address, Identity("scheduler", 0), Abort, heartbeat_s=HEARTBEAT_S,
        )
        self.workers = workers
        self.aborts = Inbox()
        self.api_joined = anyio.Event()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.endpoint.run)
            tg.start_soon(self._report_status)
            async for event in self.endpoint.inbox:
                if isinstance(event, PeerJoined) and event.peer.hello.service == "api":
                    await self._status_to(event.peer.identity)
                    self.api_joined.set()
                elif isinstance(event, Received) and isinstance(event.body, Abort):
                    self.aborts.put(event)

    async def _status_to(self, identity: bytes) -> None:
        await self.endpoint.send(identity, SchedulerStatus(workers=self.workers, running=0,
                                                           waiting=0))

    async def _report_status(self) -> None:
        while True:
            for peer in self.endpoint.peers_of("api"):
                await self._status_to(peer.identity)
            await anyio.sleep(HEARTBEAT_S)


class ApiProcess:
    """``python -m services.api`` in its own process group, its JSON log lines
    collected so a test can wait for one."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self._changed = anyio.Event()

    async def read_logs(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = {"event": raw.decode(errors="replace")}
                self.lines.append(line)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_log(self, match: Callable[[dict[str, Any]], bool],
                       timeout: float = WAIT_S) -> dict[str, Any]:
        seen = 0
        with anyio.fail_after(timeout):
            while True:
                for line in self.lines[seen:]:
                    if match(line):
                        return line
                seen = len(self.lines)
                await self._changed.wait()

    def kill(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@dataclass
class Mesh:
    ctx: zmq.asyncio.Context
    tg: TaskGroup
    ipc_dir: Path
    api: ApiProcess
    scheduler: FakeScheduler
    url: str
    sdk: openai.AsyncOpenAI  # the unmodified client, no retries
    tokenizers: list[FakeTokenizer] = field(default_factory=list)

    @property
    def api_addr(self) -> str:
        return f"ipc://{self.ipc_dir}/api.sock"

    async def add_tokenizer(self, replica: int) -> FakeTokenizer:
        tokenizer = FakeTokenizer(self.ctx, self.api_addr, replica)
        self.tokenizers.append(tokenizer)
        self.tg.start_soon(tokenizer.run)
        with anyio.fail_after(WAIT_S):
            await tokenizer.welcomed.wait()
        return tokenizer

    async def wait_healthy(self, client: httpx.AsyncClient) -> None:
        # /health is a polled endpoint by nature; poll it with a deadline.
        with anyio.fail_after(WAIT_S):
            while (await client.get(f"{self.url}/health")).status_code != 200:
                await anyio.sleep(HEARTBEAT_S / 2)



@asynccontextmanager
async def api_mesh(
    ipc_dir: Path, tokenizers: int = 1, env: dict[str, str] | None = None
) -> AsyncIterator[Mesh]:
    port = free_port()
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("MESHSERVE_", "OTEL_"))}
    child_env.update({
        "MESHSERVE_API_ADDR": f"ipc://{ipc_dir}/api.sock",
        "MESHSERVE_SCHEDULER_ADDR": f"ipc://{ipc_dir}/scheduler.sock",
        "MESHSERVE_SPEECH_ADDR": f"ipc://{ipc_dir}/speech.sock",
        "MESHSERVE_PORT": str(port),
        "MESHSERVE_HEARTBEAT_S": str(HEARTBEAT_S),
        "MESHSERVE_SHUTDOWN_GRACE_S": "2",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    })
    ctx = zmq.asyncio.Context()
    process = await anyio.open_process(
        [sys.executable, "-m", "services.api"], env=child_env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    api = ApiProcess(process)
    try:
        url = f"http://127.0.0.1:{port}"
        async with (
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(api.read_logs)
            scheduler = FakeScheduler(ctx, f"ipc://{ipc_dir}/scheduler.sock")
            tg.start_soon(scheduler.run)
            mesh = Mesh(ctx, tg, ipc_dir, api, scheduler, url, sdk)
            await api.wait_log(lambda line: line.get("event") == "http listening")
            for replica in range(tokenizers):
                await mesh.add_tokenizer(replica)
            yield mesh
            tg.cancel_scope.cancel()
    finally:
        # Shown by pytest when the test failed.
        print("\n".join(json.dumps(line) for line in api.lines))
        api.kill()
        with anyio.move_on_after(5, shield=True):
            await process.wait()
        await process.aclose()
        ctx.destroy(linger=0)


def sse_payloads(body: str) -> list[Any]:
    """The JSON payloads of an SSE body, checking OpenAI's framing on the way."""
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = body.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-2]:
        assert event.startswith("data: "), event
        payloads.append(json.loads(event.removeprefix("data: ")))
    assert events[-2] == "data: [DONE]"
    return payloads


# --- tests --------------------------------------------------------------------------


async def test_health_models_and_request_errors(ipc_dir: Path) -> None:
    env = {"MESHSERVE_MAX_REQUEST_BYTES": "4096"}
    async with api_mesh(ipc_dir, tokenizers=0, env=env) as mesh, \
            httpx.AsyncClient() as client:
        with anyio.fail_after(WAIT_S):
            await mesh.scheduler.api_joined.wait()
        health = await client.get(f"{mesh.url}/health")
        assert health.status_code == 503
        assert "no tokenizer replica is connected" in health.json()["missing"]

        no_tokenizer = await client.post(f"{mesh.url}/v1/completions",
                                         json={"model": SERVED, "prompt": "hi"})
        assert no_tokenizer.status_code == 503
        assert no_tokenizer.json()["error"]["code"] == "no_tokenizer"

        await mesh.add_tokenizer(0)
        await mesh.wait_healthy(client)
        report = (await client.get(f"{mesh.url}/health")).json()
        assert report["status"] == "ok" and report["tokenizers"] == 1 and report["workers"] == 1

        models = (await client.get(f"{mesh.url}/v1/models")).json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == [SERVED]
        sdk = mesh.sdk
        assert (await sdk.models.retrieve(SERVED)).id == SERVED
        assert [m.id async for m in sdk.models.list()] == [SERVED]

        bad_json = await client.post(f"{mesh.url}/v1/completions", content=b"{not json",
                                     headers={"content-type": "application/json"})
        assert bad_json.status_code == 400
        assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
        assert bad_json.json()["error"]["type"] == "invalid_request_error"

        wrong_type = await client.post(f"{mesh.url}/v1/chat/completions", json={
            "model": SERVED, "messages": [{"role": "user", "content": "x"}],
            "max_tokens": "many"})
        assert wrong_type.status_code == 400
        assert wrong_type.json()["error"]["param"] == "max_tokens"

        batch = await client.post(f"{mesh.url}/v1/completions",
                                  json={"model": SERVED, "prompt": ["a", "b"]})
        assert batch.status_code == 400 and batch.json()["error"]["param"] == "prompt"

        unknown_model = await client.post(f"{mesh.url}/v1/completions",
                                          json={"model": "gpt-9", "prompt": "hi"})
        assert unknown_model.status_code == 404
        assert unknown_model.json()["error"]["code"] == "model_not_found"
        with pytest.raises(openai.NotFoundError) as raised:
            await sdk.chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "hi"}])
        assert raised.value.code == "model_not_found"

        too_large = await client.post(f"{mesh.url}/v1/completions",
                                      json={"model": SERVED, "prompt": "x" * 5000})
        assert too_large.status_code == 413
        assert too_large.json()["error"]["code"] == "request_too_large"

        no_route = await client.get(f"{mesh.url}/v1/nothing")
        assert no_route.status_code == 404 and "error" in no_route.json()
        assert mesh.tokenizers[0].generate.empty()  # nothing invalid reached the mesh


async def test_completions_with_httpx_non_stream_and_stream(ipc_dir: Path) -> None:
    async with api_mesh(ipc_dir) as mesh, httpx.AsyncClient() as client:
        tokenizer = mesh.tokenizers[0]
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        traceparent = f"00-{trace_id}-b7ad6b7169203331-01"

        async with anyio.create_task_group() as tg:
            responses: list[httpx.Response] = []

            async def post() -> None:
                responses.append(await client.post(
                    f"{mesh.url}/v1/completions",
                    json={"model": SERVED, "prompt": "Once upon", "stop": "END",
                          "temperature": 0, "seed": 7},
                    headers={"traceparent": traceparent}, timeout=WAIT_S))

            tg.start_soon(post)
            got = await tokenizer.generate.get()
            request: GenerateRequest = got.body
            assert request.prompt == "Once upon" and request.messages is None
            assert request.sampling.max_tokens == 16  # OpenAI's completions default
            assert request.sampling.temperature == 0 and request.sampling.seed == 7
            assert request.detokenize.stop == ["END"]
            # The request travels under the HTTP request's trace.
            assert got.envelope.traceparent.split("-")[1] == trace_id
            await tokenizer.answer(request.request_id, [" a", " time"], finish="length")

        body = responses[0].json()
        assert responses[0].status_code == 200
        assert body["id"] == request.request_id and body["id"].startswith("cmpl-")
        assert body["object"] == "text_completion" and body["model"] == SERVED
        assert isinstance(body["created"], int)
        assert body["choices"] == [
            {"index": 0, "text": " a time", "logprobs": None, "finish_reason": "length"}]
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

        async with anyio.create_task_group() as tg:
            streamed: list[str] = []

            async def stream() -> None:
                async with client.stream(
                    "POST", f"{mesh.url}/v1/completions", timeout=WAIT_S,
                    json={"model": SERVED, "prompt": [1, 2, 3], "stream": True,
                          "max_tokens": 5, "stream_options": {"include_usage": True}},
                ) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                    streamed.append((await response.aread()).decode())

            tg.start_soon(stream)
            request = (await tokenizer.generate.get()).body
            assert request.prompt is None
            assert list(unpack_i32(request.prompt_token_ids)) == [1, 2, 3]
            assert request.sampling.max_tokens == 5
            await tokenizer.answer(request.request_id, ["x", "y", "z"])

        payloads = sse_payloads(streamed[0])
        texts = [p["choices"][0]["text"] for p in payloads if p["choices"]]
        assert "".join(texts) == "xyz"
        assert all(p["object"] == "text_completion" and p["id"] == request.request_id
                   for p in payloads)
        assert all(p["usage"] is None for p in payloads[:-1])
        assert payloads[-2]["choices"][0]["finish_reason"] == "stop"
        assert payloads[-1]["choices"] == []
        assert payloads[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                         "total_tokens": 6}


async def test_chat_with_the_openai_client(ipc_dir: Path) -> None:
    async with api_mesh(ipc_dir) as mesh:
        tokenizer = mesh.tokenizers[0]
        sdk = mesh.sdk
        messages: Any = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                         {"type": "text", "text": "there"}]},
        ]

        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def create() -> None:
                results.append(await sdk.chat.completions.create(
                    model=SERVED, messages=messages, max_completion_tokens=8))

            tg.start_soon(create)
            request = (await tokenizer.generate.get()).body
            assert [(m.role, m.content) for m in request.messages] == [
                ("system", "Be brief."), ("user", "Hi\nthere")]
            assert request.add_generation_prompt and request.sampling.max_tokens == 8
            await tokenizer.answer(request.request_id, ["Hel", "lo!"])

        completion = results[0]
        assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].message.content == "Hello!"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage.total_tokens == 5

        # Streamed, with n=2: one mesh request with n=2 (the scheduler forks it into
        # choices <id>-0 and <id>-1, seeds seed and seed+1), one merged stream.
        async with anyio.create_task_group() as tg:
            chunks: list[Any] = []

            async def stream() -> None:
                response = await sdk.chat.completions.create(
                    model=SERVED, messages=messages, stream=True, n=2, seed=11,
                    stream_options={"include_usage": True})
                async for chunk in response:
                    chunks.append(chunk)

            tg.start_soon(stream)
            first = (await tokenizer.generate.get()).body
            base = first.request_id
            assert first.n == 2 and first.sampling.seed == 11
            # The default for chat is "until the context limit": a large cap.
            assert first.sampling.max_tokens >= 1 << 16
            await tokenizer.answer(f"{base}-1", ["B1", "B2"])
            await tokenizer.answer(f"{base}-0", ["A1"], finish="length")

        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.id == base for c in chunks)
        text = {0: "", 1: ""}
        finish = {}
        for chunk in chunks:
            for choice in chunk.choices:
                text[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finish[choice.index] = choice.finish_reason
        assert text == {0: "A1", 1: "B1B2"} and finish == {0: "length", 1: "stop"}
        assert chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 3

        # Completions through the client, non-streamed with n=2.
        async with anyio.create_task_group() as tg:
            results.clear()

            async def complete() -> None:
                results.append(await sdk.completions.create(model=SERVED, prompt="p", n=2))

            tg.start_soon(complete)
            request = (await tokenizer.generate.get()).body
            assert request.n == 2
            for i in range(2):
                await tokenizer.answer(f"{request.request_id}-{i}", [str(i)])
        assert [c.text for c in results[0].choices] == ["0", "1"]
        assert [c.index for c in results[0].choices] == [0, 1]
        assert results[0].usage.completion_tokens == 2


async def test_mesh_failures_become_http_errors(ipc_dir: Path) -> None:
    env = {"MESHSERVE_REQUEST_TIMEOUT_S": "1.5"}
    async with api_mesh(ipc_dir, env=env) as mesh:
        tokenizer = mesh.tokenizers[0]
        sdk = mesh.sdk

        async def expect_error(kind: type[openai.APIStatusError], **kwargs: Any) -> Any:
            with pytest.raises(kind) as raised:
                await sdk.completions.create(model=SERVED, prompt="x", **kwargs)
            return raised.value

        async with anyio.create_task_group() as tg:
            errors: list[Any] = []

            async def busy() -> None:
                errors.append(await expect_error(openai.RateLimitError))

            tg.start_soon(busy)
            request = (await tokenizer.generate.get()).body
            await tokenizer.endpoint.send(RequestFailed(
                request.request_id, 429, "server_busy", "the waiting queue is full"))
        assert errors[0].status_code == 429 and errors[0].code == "server_busy"
        assert "queue is full" in errors[0].message

        # No news for request_timeout_s: 504, and the request is aborted in the mesh.
        async with anyio.create_task_group() as tg:
            errors.clear()

            async def silent() -> None:
                errors.append(await expect_error(openai.APIStatusError))

            tg.start_soon(silent)
            request = (await tokenizer.generate.get()).body
            abort = await mesh.scheduler.aborts.get()
            assert abort.body.request_ids == [request.request_id]
            assert (await tokenizer.aborts.get()).body.request_ids == [request.request_id]
        assert errors[0].status_code == 504 and errors[0].code == "timeout"

        # A failure in the middle of a stream arrives as an SSE error event.
        async with anyio.create_task_group() as tg:
            errors.clear()

            async def stream() -> None:
                response = await sdk.completions.create(model=SERVED, prompt="x", stream=True)
                with pytest.raises(openai.APIError) as raised:
                    async for _chunk in response:
                        pass
                errors.append(raised.value)

            tg.start_soon(stream)
            request = (await tokenizer.generate.get()).body
            await tokenizer.text(request.request_id, "partial", 0, completion_tokens=1)
            await tokenizer.endpoint.send(RequestFailed(
                request.request_id, 500, "worker_failed", "the worker crashed"))
        assert "the worker crashed" in errors[0].message


async def test_client_disconnect_aborts_in_the_mesh(ipc_dir: Path) -> None:
    async with api_mesh(ipc_dir) as mesh, httpx.AsyncClient() as client:
        tokenizer = mesh.tokenizers[0]

        async def leave_after_first_chunk() -> None:
            async with client.stream("POST", f"{mesh.url}/v1/chat/completions", json={
                "model": SERVED, "messages": [{"role": "user", "content": "go"}],
                "stream": True}, timeout=WAIT_S) as response:
                async for line in response.aiter_lines():
                    if '"content":"first"' in line:
                        return  # closes the connection mid-stream

        async with anyio.create_task_group() as tg:
            tg.start_soon(leave_after_first_chunk)
            request = (await tokenizer.generate.get()).body
            await tokenizer.text(request.request_id, "first", 0, completion_tokens=1)
        assert (await mesh.scheduler.aborts.get()).body.request_ids == [request.request_id]
        assert (await tokenizer.aborts.get()).body.request_ids == [request.request_id]

        # A non-streamed request whose client goes away is aborted too.
        async with anyio.create_task_group() as tg:

            async def post_then_vanish() -> None:
                await client.post(f"{mesh.url}/v1/completions", timeout=WAIT_S,
                                  json={"model": SERVED, "prompt": "x"})

            tg.start_soon(post_then_vanish)
            request = (await tokenizer.generate.get()).body
            tg.cancel_scope.cancel()  # the client gives up: its connection closes
        assert (await mesh.scheduler.aborts.get()).body.request_ids == [request.request_id]
        assert (await tokenizer.aborts.get()).body.request_ids == [request.request_id]


async def test_tokenizer_replica_lost_request_resent_without_duplicate_text(
    ipc_dir: Path,
) -> None:
    async with api_mesh(ipc_dir, tokenizers=2) as mesh, httpx.AsyncClient() as client:
        await mesh.wait_healthy(client)
        streamed: list[str] = []

        async def stream() -> None:
            async with client.stream("POST", f"{mesh.url}/v1/completions", timeout=WAIT_S,
                                     json={"model": SERVED, "prompt": "x", "stream": True,
                                           "max_tokens": 8}) as response:
                streamed.append((await response.aread()).decode())

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            # Least outstanding, ties to the lowest identity: tokenizer/0 gets it.
            got = await mesh.tokenizers[0].generate.get()
            request_id = got.body.request_id
            await mesh.tokenizers[0].text(request_id, "Hello ", 0, completion_tokens=1)
            mesh.tokenizers[0].kill()
            # The api notices the missed heartbeats and re-sends it to tokenizer/1,
            # which replays the text from offset 0, as a takeover does.
            resent = await mesh.tokenizers[1].generate.get()
            assert resent.body == got.body
            await mesh.tokenizers[1].answer(request_id, ["Hello ", "world"])

        payloads = sse_payloads(streamed[0])
        assert "".join(p["choices"][0]["text"] for p in payloads) == "Hello world"
        await mesh.api.wait_log(lambda line: line.get("event") == "replica lost")

        # With no replica left, what the lost one held fails with 503.
        async with anyio.create_task_group() as tg:
            statuses: list[int] = []

            async def post() -> None:
                response = await client.post(f"{mesh.url}/v1/completions", timeout=WAIT_S,
                                             json={"model": SERVED, "prompt": "x"})
                statuses.append(response.status_code)

            tg.start_soon(post)
            await mesh.tokenizers[1].generate.get()
            mesh.tokenizers[1].kill()
        assert statuses == [503]


async def test_garbage_on_the_zmq_socket_is_rejected_and_http_keeps_working(
    ipc_dir: Path,
) -> None:
    async with api_mesh(ipc_dir) as mesh, httpx.AsyncClient() as client:
        raw = mesh.ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        try:
            raw.connect(mesh.api_addr)
            await raw.send_multipart([b"\x00garbage", os.urandom(64)])
            with anyio.fail_after(WAIT_S):
                _envelope, body = await raw.recv_multipart()
            assert msgspec.msgpack.decode(body, type=Rejected).reason
        finally:
            raw.close(linger=0)
        await mesh.api.wait_log(lambda line: line.get("event") == "message rejected")

        # A well-formed message that makes no sense (unknown request) is refused too.
        tokenizer = mesh.tokenizers[0]
        await tokenizer.text("cmpl-nobody", "boo", 0, completion_tokens=1)
        rejected = await tokenizer.rejected.get()
        assert "unknown request" in rejected.body.reason

        async with anyio.create_task_group() as tg:
            results: list[httpx.Response] = []

            async def post() -> None:
                results.append(await client.post(f"{mesh.url}/v1/completions", timeout=WAIT_S,
                                                  json={"model": SERVED, "prompt": "x"}))

            tg.start_soon(post)
            request = (await tokenizer.generate.get()).body
            await tokenizer.answer(request.request_id, ["fine"])
        assert results[0].status_code == 200
        assert results[0].json()["choices"][0]["text"] == "fine"

        metrics = (await client.get(f"{mesh.url}/metrics")).text
        # prometheus_client sorts labels and writes values as floats ("1.0").
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in metrics.splitlines() if not line.startswith("#")}
        assert values[f'vllm:request_success_total{{finished_reason="stop",'
                      f'model_name="{SERVED}"}}'] == 1
        assert values[f'vllm:num_requests_running{{model_name="{SERVED}"}}'] == 0
        # the garbage and the unknown request
        assert values["meshserve:api_rejected_messages_total"] >= 2
        # The speech gateway shares the process, the app and /metrics.
        assert values["meshserve:speech_replicas_ready"] == 0
        voices = await client.get(f"{mesh.url}/v1/audio/voices")
        assert voices.status_code in (200, 503) and voices.headers["content-type"].startswith(
            "application/json")


async def test_server_span_carries_genai_attributes(ipc_dir: Path) -> None:
    async with otlp_receiver() as (collector, env), api_mesh(ipc_dir, env=env) as mesh:
        tokenizer = mesh.tokenizers[0]
        async with anyio.create_task_group() as tg:

            async def chat() -> None:
                await mesh.sdk.chat.completions.create(
                    model=SERVED, messages=[{"role": "user", "content": "hi"}],
                    max_tokens=5, temperature=0.5, top_p=0.9)

            tg.start_soon(chat)
            got = await tokenizer.generate.get()
            await tokenizer.answer(got.body.request_id, ["a", "b"])

        resource, span = await collector.get()
        assert resource["service.name"] == "api"
        assert span.name == f"chat {SERVED}" and span.kind == 2  # SERVER
        # The GenerateRequest was sent under this span.
        assert got.envelope.traceparent.split("-")[1] == span.trace_id.hex()
        assert got.envelope.traceparent.split("-")[2] == span.span_id.hex()
        attributes = attributes_of(span.attributes)
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.request.model"] == SERVED
        assert attributes["gen_ai.request.max_tokens"] == 5
        assert attributes["gen_ai.request.temperature"] == 0.5
        assert attributes["gen_ai.request.top_p"] == 0.9
        assert attributes["gen_ai.usage.input_tokens"] == 3
        assert attributes["gen_ai.usage.output_tokens"] == 2
        assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
        assert attributes["meshserve.ttft_s"] > 0
        assert [event.name for event in span.events] == ["gen_ai.first_token"]
        assert span.status.code != 2  # not ERROR

        async with anyio.create_task_group() as tg:

            async def busy() -> None:
                with pytest.raises(openai.RateLimitError):
                    await mesh.sdk.completions.create(model=SERVED, prompt="x")

            tg.start_soon(busy)
            request = (await tokenizer.generate.get()).body
            await tokenizer.endpoint.send(
                RequestFailed(request.request_id, 429, "server_busy", "full"))
        _resource, failed = await collector.get()
        assert failed.name == f"text_completion {SERVED}"
        assert failed.status.code == 2  # ERROR
        assert attributes_of(failed.attributes)["error.type"] == "server_busy"


async def test_sigterm_fails_in_flight_requests_and_exits_cleanly(ipc_dir: Path) -> None:
    # A request the mesh never answers outlives the drain: it fails at the deadline.
    env = {"MESHSERVE_SHUTDOWN_TIMEOUT_S": "0.5"}
    async with api_mesh(ipc_dir, env=env) as mesh, httpx.AsyncClient() as client:
        async with anyio.create_task_group() as tg:
            statuses: list[int] = []

            async def post() -> None:
                response = await client.post(f"{mesh.url}/v1/completions", timeout=WAIT_S,
                                             json={"model": SERVED, "prompt": "x"})
                statuses.append(response.status_code)

            tg.start_soon(post)
            await mesh.tokenizers[0].generate.get()
            mesh.api.process.send_signal(signal.SIGTERM)
        assert statuses == [503]
        with anyio.fail_after(WAIT_S):
            assert await mesh.api.process.wait() == 0
