"""The unmodified ``openai`` client against a whole mesh: chat and completions,
streaming and not, n=2, stop strings and usage."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from tests.e2e.mesh import Mesh

MESSAGES = [{"role": "user", "content": "Tell me about the mesh."}]


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> OpenAI:
    return OpenAI(base_url=mesh.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_chat_completion(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12,
                                           temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_unstreamed(client: OpenAI, model: str) -> None:
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                           temperature=0)
    pieces: list[str] = []
    usage = None
    finish = None
    for chunk in client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completion_streaming_and_not(client: OpenAI, model: str) -> None:
    whole = client.completions.create(model=model, prompt="def main():", max_tokens=10,
                                      temperature=0)
    assert whole.choices[0].text
    assert whole.usage.completion_tokens <= 10
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model=model, prompt="def main():", max_tokens=10, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == whole.choices[0].text


def test_n_2_gives_two_choices(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, n=2,
                                           temperature=1.0, seed=5)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert all(c.message.content is not None for c in reply.choices)
    # Usage counts the tokens of both choices.
    assert 2 <= reply.usage.completion_tokens <= 16
    streamed: dict[int, str] = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                                n=2, temperature=1.0, seed=5, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == {c.index: c.message.content for c in reply.choices}


def test_stop_string_ends_the_text_without_leaking(client: OpenAI, model: str) -> None:
    free = client.completions.create(model=model, prompt="import os\n", max_tokens=24,
                                     temperature=0).choices[0].text
    assert len(free) > 4
    stop = free[2:4]  # a string the model is known to produce
    stopped = client.completions.create(model=model, prompt="import os\n", max_tokens=24,
                                        temperature=0, stop=[stop])
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == free[: free.index(stop)]
    assert stop not in choice.text


def test_errors_are_openai_errors(client: OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=-1)


def test_status_lists_every_service(mesh: Mesh) -> None:
    services = {(c["service"], c["replica"]) for c in mesh.status()["children"]
                if c["healthy"] and c["pid"]}
    assert {("api", 0), ("scheduler", 0), ("kvcache", 0), ("tokenizer", 0),
            ("worker", 0)} <= services


def test_speech_through_the_whole_mesh(client: OpenAI, mesh: Mesh) -> None:
    """`meshserve up` starts a tts replica too: speech comes back as a real WAV."""
    import io
    import wave

    assert any(c["service"] == "tts" and c["healthy"] for c in mesh.status()["children"])
    audio = client.audio.speech.create(model="tts-1", voice="alloy",
                                       input="The mesh speaks.", response_format="wav")
    with wave.open(io.BytesIO(audio.content)) as wav:
        assert wav.getnchannels() == 1
        assert wav.getnframes() / wav.getframerate() > 0.3
