"""One streamed request to an OpenAI-compatible server, timed as it arrives.

The body asks for exactly ``output_len`` tokens: ``max_tokens`` (chat:
``max_completion_tokens``) with ``ignore_eos``, and ``stream_options.include_usage``
so the server's own token counts come back in the last chunk. A chunk whose text
is empty (chat's opening role delta, a bare finish_reason) is not a token: it
moves neither TTFT nor ITL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from bench.datasets import SampleRequest
from bench.metrics import RequestRecord

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT)

_decode = msgspec.json.Decoder().decode


@dataclass(frozen=True, slots=True)
class Endpoint:
    base_url: str
    path: str
    model: str
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.path

    @property
    def is_chat(self) -> bool:
        return self.path == CHAT

    def body(self, sample: SampleRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": self.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.is_chat:
            if not isinstance(sample.prompt, str):
                raise TypeError("chat requests need text prompts")
            body["messages"] = [{"role": "user", "content": sample.prompt}]
            body["max_completion_tokens"] = sample.output_len
        else:
            body["prompt"] = sample.prompt
            body["max_tokens"] = sample.output_len
        return body | self.extra_body


def make_client(max_connections: int, timeout_s: float) -> httpx.AsyncClient:
    """HTTP/1.1 (one stream per connection, as vLLM's aiohttp client) with a pool
    as large as the concurrency, so no request waits for a connection."""
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections)
    return httpx.AsyncClient(http1=True, http2=False, limits=limits,
                             timeout=httpx.Timeout(timeout_s, connect=60.0))


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    sample: SampleRequest,
    record: RequestRecord,
    run_start: float,
) -> str:
    """Send ``sample``, fill ``record`` with what was measured, return the text.
    Failures are recorded (``success`` false, ``error``), never raised: one bad
    request must not end a benchmark."""
    pieces: list[str] = []
    chunks = 0
    start = time.perf_counter()
    last = start
    record.start_s = start - run_start
    try:
        async with client.stream("POST", endpoint.url, json=endpoint.body(sample)) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                record.error = f"HTTP {response.status_code}: {detail}"
                return ""
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = _decode(data)
                if "error" in chunk:
                    record.error = f"error event: {chunk['error']}"
                    return "".join(pieces)
                if usage := chunk.get("usage"):
                    record.output_tokens = int(usage.get("completion_tokens") or 0)
                    record.prompt_len = int(usage.get("prompt_tokens") or record.prompt_len)
                text = _chunk_text(chunk, endpoint.is_chat)
                if not text:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    record.ttft_s = now - start
                else:
                    record.itl_s.append(now - last)
                last = now
                chunks += 1
                pieces.append(text)
    except (httpx.HTTPError, msgspec.DecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return "".join(pieces)
    record.latency_s = time.perf_counter() - start
    if record.output_tokens == 0:
        record.output_tokens = chunks  # no usage from this server: count chunks
    if chunks == 0:
        record.error = "the response carried no tokens"
        return ""
    record.success = True
    return "".join(pieces)
