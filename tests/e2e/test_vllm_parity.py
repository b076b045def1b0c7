"""A vLLM user's operations against a whole mesh started as `meshserve up --model
ORG/NAME` from an offline Hugging Face cache this test lays out: /v1/models with
aliases and max_model_len, any alias as `model`, /tokenize and /detokenize equal to
transformers' tokenizer, and X-Request-Id. The unmodified openai client where it
has the call; httpx for vLLM's own routes."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared.embedded_model import ensure_embedded_model
from tests.e2e.mesh import Mesh, free_port, meshserve, short_run_dir, start_mesh

pytestmark = pytest.mark.slow

HUB_ID = "meshtest/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"
ALIASES = ["tiny", "tiny-alias"]
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three colours."}]
PROMPTS = ["Hello, mesh!", "  leading spaces and ünïcode ✓", "a"]


def lay_out_hub_cache(hf_home: Path, repo_id: str, source: Path) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>}."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    hf_home = tmp_path_factory.mktemp("hf")
    lay_out_hub_cache(hf_home, HUB_ID, ensure_embedded_model())
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, hub: dict[str, str]) -> Iterator[Mesh]:
    running = start_mesh(
        tmp_path_factory.mktemp("mesh"),
        extra_args=("--model", HUB_ID, "--served-model-name", *ALIASES, "--tts", "0",
                    "--max-model-len", "1024", "--no-enable-prefix-caching"),
        env=hub,
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> OpenAI:
    return OpenAI(base_url=mesh.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def test_hub_id_served_under_every_alias(mesh: Mesh, client: OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ALIASES
    for card in models:
        assert (card.model_extra or {})["max_model_len"] == 1024
    assert mesh.status()["model"].endswith(REVISION)  # the snapshot folder of the cache
    for alias in ALIASES:
        reply = client.completions.create(model=alias, prompt="Hello", max_tokens=3,
                                          temperature=0)
        assert reply.model == alias
        assert reply.usage is not None and reply.usage.completion_tokens == 3
    with pytest.raises(Exception, match="does not exist"):
        client.completions.create(model=HUB_ID, prompt="Hello", max_tokens=1)


def test_tokenize_equals_transformers(mesh: Mesh, tokenizer: PreTrainedTokenizerBase) -> None:
    for prompt in PROMPTS:
        answer = httpx.post(mesh.base_url + "/tokenize", json={"model": ALIASES[1],
                                                               "prompt": prompt}, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        expected = tokenizer(prompt).input_ids
        assert body["tokens"] == expected
        assert body["count"] == len(expected)
        assert body["max_model_len"] == 1024
        bare = httpx.post(mesh.base_url + "/tokenize", timeout=30,
                          json={"prompt": prompt, "add_special_tokens": False}).json()
        assert bare["tokens"] == tokenizer(prompt, add_special_tokens=False).input_ids
    counts = {}
    for add_generation_prompt in (True, False):
        text = tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        chat = httpx.post(mesh.base_url + "/tokenize", timeout=30, json={
            "messages": MESSAGES, "add_generation_prompt": add_generation_prompt}).json()
        assert chat["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
        counts[add_generation_prompt] = chat["count"]
    # The prompt the mesh generates from is the one /tokenize shows.
    usage = OpenAI(base_url=mesh.base_url + "/v1", api_key="x").chat.completions.create(
        model=ALIASES[0], messages=MESSAGES, max_tokens=1).usage  # type: ignore[arg-type]
    assert usage is not None and usage.prompt_tokens == counts[True]


def test_detokenize_round_trips(mesh: Mesh, tokenizer: PreTrainedTokenizerBase) -> None:
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        answer = httpx.post(mesh.base_url + "/detokenize", json={"tokens": ids}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"prompt": tokenizer.decode(ids)}


def test_tokenize_errors_are_400(mesh: Mesh) -> None:
    cases = [
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}),
        ("/tokenize", {}),
        ("/tokenize", {"prompt": "x", "return_token_strs": True}),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}),
        ("/detokenize", {"tokens": [10**6]}),
        ("/detokenize", {"tokens": "abc"}),
    ]
    for path, body in cases:
        answer = httpx.post(mesh.base_url + path, json=body, timeout=30)
        assert answer.status_code == 400, (path, body, answer.text)
        assert answer.json()["error"]["message"]
    wrong_model = httpx.post(mesh.base_url + "/tokenize", json={"model": "nope", "prompt": "x"},
                             timeout=30)
    assert wrong_model.status_code == 404


def test_x_request_id_is_used_and_echoed(mesh: Mesh, client: OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model=ALIASES[0], prompt="Hi", max_tokens=2, extra_headers={"X-Request-Id": "req-42"})
    assert raw.headers["x-request-id"] == "req-42"
    assert raw.parse().id == "cmpl-req-42"
    generated = client.chat.completions.with_raw_response.create(
        model=ALIASES[0], messages=MESSAGES, max_tokens=2)
    rid = generated.headers["x-request-id"]
    assert rid and generated.parse().id == f"chatcmpl-{rid}"
    # Errors carry it too, and an id may be reused once its request is over.
    error = httpx.post(mesh.base_url + "/tokenize", json={}, headers={"X-Request-Id": "req-42"},
                       timeout=30)
    assert (error.status_code, error.headers["x-request-id"]) == (400, "req-42")
    # Unique among requests in flight: while one under "held" is still sending its
    # body (a raw socket that never finishes it), a second under that id is refused.
    with socket.create_connection(("127.0.0.1", mesh.port), timeout=30) as held:
        held.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: held\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        clash = _post_until_refused(mesh, "held")
        assert clash.status_code == 400 and "already in use" in clash.text
    # Once that request is gone, the id is free again.
    reused = _post_until_refused(mesh, "held", expect=200)
    assert reused.status_code == 200
    bad = httpx.post(mesh.base_url + "/v1/completions", headers={"X-Request-Id": "has space"},
                     json={"prompt": "x", "max_tokens": 1}, timeout=30)
    assert bad.status_code == 400


def _post_until_refused(mesh: Mesh, rid: str, expect: int = 400) -> httpx.Response:
    """POST under ``rid`` until the answer has status ``expect`` (the raw socket's
    request reaches the server, or leaves it, a moment after its bytes are sent)."""
    deadline = time.monotonic() + 30
    while True:
        answer = httpx.post(mesh.base_url + "/v1/completions", headers={"X-Request-Id": rid},
                            json={"prompt": "x", "max_tokens": 1}, timeout=30)
        if answer.status_code == expect or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def test_offline_hub_id_not_in_cache_fails_clearly(hub: dict[str, str]) -> None:
    run_dir = short_run_dir()
    try:
        done = meshserve(run_dir, "up", "--model", "meshtest/absent", "--port",
                         str(free_port()), "--tts", "0", env=hub, timeout=120)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert done.returncode != 0
    assert "meshtest/absent" in done.stderr + done.stdout
    assert "HF_HUB_OFFLINE" in done.stderr + done.stdout
