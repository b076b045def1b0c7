"""`meshserve up --api-key` end to end: the unmodified openai client without a valid
key gets ``AuthenticationError`` (401), with one it is served; the probes and the
scrape stay open. The mesh speaks CURVE: its keys were made private in the run
dir, the CLI reaches the mesh with them, and a ZMQ peer without them is counted
on /metrics and gets nothing through."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import zmq
from openai import OpenAI

from shared.frames import FrameWriter
from shared.mesh import Identity
from tests.e2e.mesh import Mesh, start_mesh

pytestmark = pytest.mark.slow

KEYS = ("sk-first", "sk-second")
MODEL = "meshserve-tiny-llama"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    args = [arg for key in KEYS for arg in ("--api-key", key)]
    running = start_mesh(tmp_path_factory.mktemp("mesh"), extra_args=args)
    try:
        yield running
    finally:
        running.stop()


def metric(mesh: Mesh, name: str) -> int:
    lines = httpx.get(mesh.base_url + "/metrics", timeout=10).text.splitlines()
    return int(float(next(line for line in lines if line.startswith(name + " ")).split()[1]))


def test_openai_client_needs_one_of_the_keys(mesh: Mesh) -> None:
    for wrong in ("sk-wrong", "sk-first-but-longer"):
        client = OpenAI(base_url=mesh.base_url + "/v1", api_key=wrong, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            client.models.list()
        assert refused.value.status_code == 401
        assert refused.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    no_header = httpx.post(mesh.base_url + "/v1/chat/completions", timeout=10,
                           json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert no_header.status_code == 401
    assert no_header.json()["error"]["type"] == "invalid_request_error"
    for key in KEYS:
        client = OpenAI(base_url=mesh.base_url + "/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        reply = client.completions.create(model=MODEL, prompt="The mesh", max_tokens=3,
                                          temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
    assert metric(mesh, "meshserve:api_auth_failures_total") >= 5


def test_probes_and_scrape_stay_open(mesh: Mesh) -> None:
    assert httpx.get(mesh.base_url + "/health", timeout=10).status_code == 200
    assert httpx.get(mesh.base_url + "/metrics", timeout=10).status_code == 200


def test_keys_are_private_and_the_cli_uses_them(mesh: Mesh) -> None:
    key_dir = mesh.run_dir / "keys"
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    for path in key_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Over the CURVE control socket and the CURVE kvcache/scheduler sockets.
    assert mesh.status()["healthy"]
    stats = mesh.cli("kv", "stats", "--json", timeout=60)
    assert stats.returncode == 0, stats.stderr
    for json_flag in ((), ("--json",)):
        config = mesh.cli("config", "--api-key", "sk-shown?", *json_flag, timeout=60)
        assert config.returncode == 0 and "sk-shown?" not in config.stdout
        assert "<set, not shown>" in config.stdout


def test_a_zmq_peer_without_the_keys_gets_nothing_through(mesh: Mesh) -> None:
    before = metric(mesh, "meshserve:zmq_auth_failures_total")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        raw.connect(f"ipc://{mesh.run_dir / 'api.sock'}")
        writer = FrameWriter("tokenizer/9")
        raw.send_multipart(writer.frames(Identity("tokenizer", 9).hello(ready=True)))
        deadline = time.monotonic() + 60
        while metric(mesh, "meshserve:zmq_auth_failures_total") <= before:
            assert time.monotonic() < deadline, mesh.logs()
            time.sleep(0.1)  # a counter across processes: polled with a deadline
        assert not raw.poll(500)  # no Welcome: the api never saw the hello
    finally:
        raw.close(linger=0)
        ctx.term()
    tokenizers = [c for c in mesh.status()["children"] if c["service"] == "tokenizer"]
    assert len(tokenizers) == 1
