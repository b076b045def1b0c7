"""A streamed request's HTTP status is decided by the mesh: the api holds the headers
until the first delta, the end or the failure, so a refusal (queue full, prompt too
long, no scheduler) is a real 4xx/5xx with the OpenAI error body and ``Retry-After``,
while a stream the mesh accepts still gets its first delta with the headers. A real
``python -m services.api`` driven over HTTP, the test playing its mesh peers (the
fakes of test_api_service.py) over real ipc sockets."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.protocol.generation import RequestFailed
from tests.integration.test_api_service import SERVED, WAIT_S, api_mesh, sse_payloads

pytestmark = pytest.mark.anyio

STREAMED = {"model": SERVED, "prompt": "x", "stream": True}


async def test_refused_streams_get_http_statuses(ipc_dir: Path) -> None:
    async with api_mesh(ipc_dir) as mesh, httpx.AsyncClient() as client:
        tokenizer = mesh.tokenizers[0]
        refusals = [
            (429, "server_busy", "the waiting queue is full", "1"),
            (400, "invalid_request_error", "the prompt has 9000 tokens; max 2048", None),
            (503, "server_error", "scheduler unavailable", "2"),
        ]
        replies: list[httpx.Response] = []

        async def post() -> None:
            replies.append(await client.post(f"{mesh.url}/v1/completions", json=STREAMED,
                                              timeout=WAIT_S))

        for status, code, message, retry_after in refusals:
            replies.clear()
            async with anyio.create_task_group() as tg:
                tg.start_soon(post)
                request = (await tokenizer.generate.get()).body
                await tokenizer.endpoint.send(
                    RequestFailed(request.request_id, status, code, message))
            reply = replies[0]
            assert reply.status_code == status, reply.text
            assert reply.headers["content-type"] == "application/json"
            assert reply.headers.get("retry-after") == retry_after
            error = reply.json()["error"]
            assert error["code"] == code and error["message"] == message
            assert set(error) == {"message", "type", "param", "code"}

        # The unmodified client raises at create(), before any iteration, as for a
        # request that was not streamed.
        async with anyio.create_task_group() as tg:
            raised: list[openai.APIStatusError] = []

            async def chat() -> None:
                with pytest.raises(openai.RateLimitError) as caught:
                    await mesh.sdk.chat.completions.create(
                        model=SERVED, messages=[{"role": "user", "content": "hi"}],
                        stream=True)
                raised.append(caught.value)

            tg.start_soon(chat)
            request = (await tokenizer.generate.get()).body
            await tokenizer.endpoint.send(RequestFailed(
                request.request_id, 429, "server_busy", "tokenizer 0 holds max_inflight=1"))
        assert raised[0].status_code == 429 and raised[0].code == "server_busy"

        # Each refusal is counted once, by its status and code.
        exposition = (await client.get(f"{mesh.url}/metrics")).text
        errors = {
            (sample.labels["status"], sample.labels["code"]): sample.value
            for family in text_string_to_metric_families(exposition)
            for sample in family.samples
            if sample.name == "meshserve:api_request_errors_total"
        }
        assert errors[("429", "server_busy")] == 2
        assert errors[("400", "invalid_request_error")] == 1
        assert errors[("503", "server_error")] == 1


async def test_stream_headers_go_out_with_the_first_delta(ipc_dir: Path) -> None:
    async with api_mesh(ipc_dir) as mesh, httpx.AsyncClient() as client:
        tokenizer = mesh.tokenizers[0]
        first_text = anyio.Event()
        seen: list[str] = []
        headers: list[httpx.Headers] = []
        status: list[int] = []

        async def stream() -> None:
            async with client.stream("POST", f"{mesh.url}/v1/chat/completions", timeout=WAIT_S,
                                     json={"model": SERVED, "stream": True, "messages": [
                                         {"role": "user", "content": "hi"}]}) as response:
                status.append(response.status_code)
                headers.append(response.headers)
                async for line in response.aiter_lines():
                    seen.append(line)
                    if '"content":"Hel"' in line:
                        first_text.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            request = (await tokenizer.generate.get()).body
            await tokenizer.text(request.request_id, "Hel", 0, completion_tokens=1)
            # The first delta reaches the client on its own: nothing waits for more.
            with anyio.fail_after(WAIT_S):
                await first_text.wait()
            await tokenizer.text(request.request_id, "lo", 3, completion_tokens=2,
                                 finish="stop")
        assert status == [200]
        assert headers[0]["content-type"].startswith("text/event-stream")
        payloads = sse_payloads("".join(line + "\n" for line in seen))
        deltas = [p["choices"][0]["delta"] for p in payloads]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert "".join(d.get("content") or "" for d in deltas) == "Hello"
        assert payloads[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_waiting_for_its_first_delta(ipc_dir: Path) -> None:
    env = {"MESHSERVE_REQUEST_TIMEOUT_S": "1.5"}
    async with api_mesh(ipc_dir, env=env) as mesh, httpx.AsyncClient() as client:
        tokenizer = mesh.tokenizers[0]

        # A client that leaves before anything was sent is noticed while waiting:
        # the request is aborted in the mesh at once.
        async with anyio.create_task_group() as tg:

            async def leave() -> None:
                async with client.stream("POST", f"{mesh.url}/v1/completions", json=STREAMED,
                                         timeout=WAIT_S) as response:
                    await response.aread()

            tg.start_soon(leave)
            request = (await tokenizer.generate.get()).body
            tg.cancel_scope.cancel()  # the client gives up: its connection closes
        assert (await mesh.scheduler.aborts.get()).body.request_ids == [request.request_id]
        assert (await tokenizer.aborts.get()).body.request_ids == [request.request_id]
        await mesh.api.wait_log(lambda line: line.get("event") == "client disconnected"
                                and line.get("request_id") == request.request_id)

        # No news from the mesh: 504 as a status, and the request is aborted.
        replies: list[httpx.Response] = []
        async with anyio.create_task_group() as tg:

            async def silent() -> None:
                replies.append(await client.post(f"{mesh.url}/v1/completions", json=STREAMED,
                                                  timeout=WAIT_S))

            tg.start_soon(silent)
            request = (await tokenizer.generate.get()).body
            assert (await mesh.scheduler.aborts.get()).body.request_ids == [request.request_id]
        assert replies[0].status_code == 504
        assert replies[0].json()["error"]["code"] == "timeout"


async def test_drain_deadline_before_the_first_delta_is_a_503(ipc_dir: Path) -> None:
    env = {"MESHSERVE_SHUTDOWN_TIMEOUT_S": "0.5"}
    async with api_mesh(ipc_dir, env=env) as mesh, httpx.AsyncClient() as client:
        replies: list[httpx.Response] = []
        async with anyio.create_task_group() as tg:

            async def post() -> None:
                replies.append(await client.post(f"{mesh.url}/v1/completions", json=STREAMED,
                                                  timeout=WAIT_S))

            tg.start_soon(post)
            await mesh.tokenizers[0].generate.get()
            mesh.api.process.send_signal(signal.SIGTERM)
        reply: Any = replies[0]
        assert reply.status_code == 503 and reply.headers["retry-after"] == "2"
        assert reply.json()["error"]["code"] == "shutting_down"
        with anyio.fail_after(WAIT_S):
            assert await mesh.api.process.wait() == 0
