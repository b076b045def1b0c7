"""The api process drains on SIGTERM, answers health probes, busy answers carry
``Retry-After``, and slow clients are cut off: a real ``python -m services.api``
driven over HTTP and raw TCP while the test plays its mesh peers (the fakes of
test_api_service.py) over real ipc sockets."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from shared.protocol.generation import RequestFailed
from tests.integration.test_api_service import (
    SERVED,
    WAIT_S,
    FakeTokenizer,
    Mesh,
    api_mesh,
    sse_payloads,
)

pytestmark = pytest.mark.anyio


def is_draining(line: dict[str, Any]) -> bool:
    return line.get("event") == "draining" and "timeout_s" in line


async def start_stream(client: httpx.AsyncClient, mesh: Mesh, bodies: list[str]) -> None:
    async with client.stream("POST", f"{mesh.url}/v1/completions", timeout=WAIT_S * 2, json={
            "model": SERVED, "prompt": "x", "stream": True}) as response:
        assert response.status_code == 200
        bodies.append((await response.aread()).decode())


async def next_request_id(tokenizer: FakeTokenizer) -> str:
    request_id: str = (await tokenizer.generate.get()).body.request_id
    return request_id


async def test_sigterm_drains_in_flight_refuses_new_and_exits(ipc_dir: Path) -> None:
    async with api_mesh(ipc_dir) as mesh, httpx.AsyncClient() as client:
        tokenizer = mesh.tokenizers[0]
        await mesh.wait_healthy(client)
        assert (await client.get(f"{mesh.url}/health/ready")).status_code == 200
        assert (await client.get(f"{mesh.url}/health/live")).status_code == 200
        bodies: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(start_stream, client, mesh, bodies)
            request_id = await next_request_id(tokenizer)
            await tokenizer.text(request_id, "Hello", 0, completion_tokens=1)

            mesh.api.process.send_signal(signal.SIGTERM)
            await mesh.api.wait_log(is_draining)

            refused = await client.post(f"{mesh.url}/v1/completions",
                                        json={"model": SERVED, "prompt": "new"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            assert int(refused.headers["retry-after"]) >= 1
            ready = await client.get(f"{mesh.url}/health/ready")
            assert ready.status_code == 503
            assert "the api is draining for shutdown" in ready.json()["missing"]
            assert (await client.get(f"{mesh.url}/health")).status_code == 503
            assert (await client.get(f"{mesh.url}/health/live")).status_code == 200
            assert mesh.api.process.returncode is None  # still draining: one request left

            await tokenizer.text(request_id, " world", 5, completion_tokens=2, finish="length")
        payloads = sse_payloads(bodies[0])
        assert "".join(p["choices"][0]["text"] for p in payloads if p["choices"]) == \
            "Hello world"
        assert payloads[-1]["choices"][0]["finish_reason"] == "length"
        with anyio.fail_after(WAIT_S):
            assert await mesh.api.process.wait() == 0
        assert mesh.scheduler.aborts.empty()  # it finished: nothing to abort
        assert tokenizer.generate.empty()  # the refused request never reached the mesh


async def test_drain_deadline_ends_streams_cleanly_and_aborts_them(ipc_dir: Path) -> None:
    env = {"MESHSERVE_SHUTDOWN_TIMEOUT_S": "1"}
    async with api_mesh(ipc_dir, env=env) as mesh, httpx.AsyncClient() as client:
        tokenizer = mesh.tokenizers[0]
        bodies: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(start_stream, client, mesh, bodies)
            request_id = await next_request_id(tokenizer)
            await tokenizer.text(request_id, "partial", 0, completion_tokens=1)
            mesh.api.process.send_signal(signal.SIGTERM)
        payloads = sse_payloads(bodies[0])  # ends with [DONE]: a clean end of stream
        assert payloads[0]["choices"][0]["text"] == "partial"
        assert payloads[-1]["error"]["code"] == "shutting_down"
        # Aborted in the mesh before the sockets closed: nothing runs on for nobody.
        assert (await mesh.scheduler.aborts.get()).body.request_ids == [request_id]
        assert (await tokenizer.aborts.get()).body.request_ids == [request_id]
        with anyio.fail_after(WAIT_S):
            assert await mesh.api.process.wait() == 0


async def test_busy_answers_carry_retry_after(ipc_dir: Path) -> None:
    env = {"MESHSERVE_MAX_INFLIGHT": "1"}
    async with api_mesh(ipc_dir, env=env) as mesh, httpx.AsyncClient() as client:
        tokenizer = mesh.tokenizers[0]
        replies: list[httpx.Response] = []

        async def post() -> None:
            replies.append(await client.post(f"{mesh.url}/v1/completions", timeout=WAIT_S,
                                             json={"model": SERVED, "prompt": "x"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(post)
            request_id = await next_request_id(tokenizer)
            # The api's own bound (max_inflight=1) is full now: 429 at once.
            over = await client.post(f"{mesh.url}/v1/completions",
                                     json={"model": SERVED, "prompt": "y"})
            assert over.status_code == 429 and over.headers["retry-after"] == "1"
            # The mesh's busy answer (a tokenizer's max_inflight, the scheduler's queue).
            await tokenizer.endpoint.send(RequestFailed(
                request_id, 429, "server_busy", "the waiting queue is full"))
        assert replies[0].status_code == 429
        assert replies[0].headers["retry-after"] == "1"
        assert replies[0].json()["error"]["type"] == "rate_limit_error"


async def test_slow_clients_are_cut_off(ipc_dir: Path) -> None:
    env = {"MESHSERVE_HEADER_TIMEOUT_S": "0.5", "MESHSERVE_BODY_TIMEOUT_S": "0.5"}
    async with api_mesh(ipc_dir, env=env) as mesh:
        port = int(mesh.url.rsplit(":", 1)[1])

        async def closed_after(sent: bytes) -> bytes:
            """Everything the server sends until it closes the connection."""
            received = b""
            with anyio.fail_after(WAIT_S):
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    if sent:
                        await stream.send(sent)
                    try:
                        while True:
                            received += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return received

        # Connects and says nothing; then a head that never ends (slowloris).
        assert await closed_after(b"") == b""
        assert await closed_after(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n") == b""
        # A body that never arrives in full: 408 with an OpenAI error.
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json"
                b"\r\ncontent-length: 100\r\nconnection: close\r\n\r\n{\"model\":")
        answer = await closed_after(head)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code":"request_timeout"' in answer
        # Well-behaved clients are unaffected.
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{mesh.url}/health/live")).status_code == 200
