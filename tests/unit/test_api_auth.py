"""API keys on HTTP: the guard around a real Starlette app, over httpx's ASGI
transport: 401 with OpenAI's body without a valid key, the probes and the scrape
open, several keys accepted, and no keys meaning an open API."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from services.api.auth import ApiKeyCheck, ApiKeyGuard, bearer_token, parse_api_keys
from services.api.metrics import render_auth_metrics

pytestmark = pytest.mark.anyio


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


APP = Starlette(routes=[Route(path, ok, methods=["GET", "POST"]) for path in (
    "/v1/models", "/v1/completions", "/v1/audio/speech", "/health", "/health/ready",
    "/metrics", "/openapi.json")])


def client(setting: str) -> tuple[httpx.AsyncClient, ApiKeyGuard]:
    guard = ApiKeyGuard(APP, ApiKeyCheck(parse_api_keys(setting)))
    transport = httpx.ASGITransport(app=guard)
    return httpx.AsyncClient(transport=transport, base_url="http://api"), guard


def test_keys_setting_and_bearer_header() -> None:
    assert parse_api_keys("") == ()
    assert parse_api_keys(" a , b,,") == (b"a", b"b")
    assert bearer_token("Bearer sk-1") == b"sk-1"
    assert bearer_token("bearer  sk-1 ") == b"sk-1"
    assert bearer_token("Basic c2stMQ==") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    check = ApiKeyCheck((b"sk-1", b"sk-2"))
    assert check.accepts(b"sk-2") and not check.accepts(b"sk-") and not check.accepts(b"sk-22")


async def test_requests_without_a_valid_key_get_openai_401() -> None:
    http, guard = client("sk-one,sk-two")
    async with http:
        for path in ("/v1/models", "/v1/audio/speech", "/nowhere"):
            missing = await http.get(path)
            assert missing.status_code == 401, path
            assert missing.headers["www-authenticate"] == "Bearer"
            error = missing.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["code"] == "invalid_api_key" and error["param"] is None
            assert "didn't provide an API key" in error["message"]
        wrong = await http.post("/v1/completions", headers={"Authorization": "Bearer sk-three"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["message"] == "Incorrect API key provided."
        assert "sk-three" not in wrong.text
        basic = await http.get("/v1/models", headers={"Authorization": "Basic sk-one"})
        assert basic.status_code == 401
        assert guard.refusals.count == 5
        for key in ("sk-one", "sk-two"):
            good = await http.post("/v1/completions", headers={"Authorization": f"Bearer {key}"})
            assert good.status_code == 200 and good.text == "ok"
        assert guard.refusals.count == 5


async def test_probes_scrape_and_schema_stay_open() -> None:
    http, guard = client("sk-one")
    async with http:
        for path in ("/health", "/health/ready", "/metrics", "/openapi.json"):
            assert (await http.get(path)).status_code == 200, path
        # A path that merely starts like an open one is not open.
        assert (await http.get("/healthz")).status_code == 401
    assert guard.refusals.count == 1


async def test_no_keys_is_an_open_api() -> None:
    http, _ = client(" , ")
    async with http:
        assert (await http.get("/v1/models")).status_code == 200
        keyed = await http.get("/v1/models", headers={"Authorization": "Bearer x"})
        assert keyed.status_code == 200


def test_auth_failures_on_metrics() -> None:
    text = render_auth_metrics(3, 7)
    assert "meshserve:api_auth_failures_total 3.0" in text.splitlines()
    assert "meshserve:zmq_auth_failures_total 7.0" in text.splitlines()
    assert "# TYPE meshserve:zmq_auth_failures_total counter" in text
