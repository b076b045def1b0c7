"""Sampling extras through the whole mesh with the unmodified ``openai`` client:
logprobs (completions, chat, streamed and not, echo and vLLM's prompt_logprobs)
equal transformers' ``log_softmax`` on the same weights within 1e-4, top-k order
included; penalties match vLLM's formulas token for token (greedy); echo with
``max_tokens`` 0; logit_bias, bad_words and min_p are honoured, not ignored."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from openai import OpenAI

from shared.embedded_model import ensure_embedded_model
from tests.e2e.mesh import Mesh
from tests.sampling_reference import greedy_with_penalties, load_oracle, oracle_logits

PROMPT = [5, 17, 300, 41, 999, 7, 7, 123, 64, 5, 17, 88, 250, 77, 31]
TOL = 1e-4


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> OpenAI:
    return OpenAI(base_url=mesh.base_url + "/v1", api_key="unused", max_retries=0,
                  timeout=300)


@pytest.fixture(scope="module")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def oracle() -> Any:
    return load_oracle(ensure_embedded_model())


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def greedy(oracle: Any, prompt: list[int], steps: int) -> list[int]:
    return greedy_with_penalties(oracle, prompt, steps, 0.0, 0.0, 1.0)


def expected_top(tokenizer: Any, row: torch.Tensor, chosen: int, k: int) -> dict[str, float]:
    """The completions ``top_logprobs`` entry meshserve promises: the k best, then
    the chosen token when it is not among them, keyed by each id's text."""
    top = row.topk(k)
    out = {tokenizer.decode([t]): float(v) for t, v in zip(top.indices.tolist(),
                                                            top.values.tolist(), strict=True)}
    out.setdefault(tokenizer.decode([chosen]), float(row[chosen]))
    return out


def assert_top_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)  # same tokens, same order
    assert max(abs(got[k] - want[k]) for k in want) < TOL


def test_completion_logprobs_with_echo_and_prompt_logprobs(
        client: OpenAI, model: str, oracle: Any, tokenizer: Any) -> None:
    outputs = greedy(oracle, PROMPT, 6)
    reference = torch.log_softmax(oracle_logits(oracle, PROMPT + outputs), dim=-1)
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                      echo=True, logprobs=5,
                                      extra_body={"prompt_logprobs": 3, "ignore_eos": True})
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None
    every = PROMPT + outputs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in every]
    assert choice.text == tokenizer.decode(PROMPT) + tokenizer.decode(outputs,
                                                                      skip_special_tokens=True)
    values = logprobs.token_logprobs
    tops = logprobs.top_logprobs
    assert values is not None and tops is not None and values[0] is None and tops[0] is None
    for position in range(1, len(every)):
        row = reference[position - 1]
        assert abs(values[position] - float(row[every[position]])) < TOL
        assert_top_equal(tops[position], expected_top(tokenizer, row, every[position], 5))
    offsets = logprobs.text_offset
    assert offsets is not None and offsets[0] == 0
    assert all(b - a == len(t)
               for a, b, t in zip(offsets, offsets[1:], logprobs.tokens, strict=False))
    # vLLM's prompt_logprobs: keyed by token id, ranks included.
    prompt_logprobs = (choice.model_extra or {})["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(PROMPT)
    for position in range(1, len(PROMPT)):
        row = reference[position - 1]
        entry = prompt_logprobs[position]
        own = entry[str(PROMPT[position])]
        assert abs(own["logprob"] - float(row[PROMPT[position]])) < TOL
        assert own["rank"] == int((row >= row[PROMPT[position]]).sum())
        top = row.topk(3)
        for rank, (token, value) in enumerate(zip(top.indices.tolist(), top.values.tolist(),
                                                  strict=True), start=1):
            assert entry[str(token)]["rank"] == rank
            assert abs(entry[str(token)]["logprob"] - value) < TOL


def test_streamed_completion_logprobs_equal_unstreamed(client: OpenAI, model: str) -> None:
    body: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 8,
                            "temperature": 0, "logprobs": 2,
                            "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**body).choices[0].logprobs
    tokens: list[str] = []
    values: list[float | None] = []
    for chunk in client.completions.create(stream=True, **body):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens or []
                values += choice.logprobs.token_logprobs or []
    assert whole is not None and tokens == whole.tokens
    assert max(abs(a - b) for a, b in zip(values, whole.token_logprobs or [], strict=True)
               if a is not None and b is not None) < TOL


def test_chat_logprobs_streamed_and_not(client: OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "Tell me about the mesh."}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=10,
                                           temperature=0, logprobs=True, top_logprobs=4)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 4
        top = [t.logprob for t in token.top_logprobs]
        assert top == sorted(top, reverse=True)
        assert token.top_logprobs[0].token == token.token  # greedy: the best one
        assert abs(token.logprob - top[0]) < TOL and token.bytes == list(token.token.encode())
    streamed = []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=10,
                                                temperature=0, logprobs=True, top_logprobs=4,
                                                stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed += choice.logprobs.content
    assert [t.token for t in streamed] == [t.token for t in content]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, content, strict=True)) < TOL
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                           temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs(
        client: OpenAI, model: str, oracle: Any) -> None:
    reply = client.completions.create(model=model, prompt="The mesh serves", max_tokens=0,
                                      echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == "The mesh serves" and choice.finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 0
    assert choice.logprobs is not None
    tokens = choice.logprobs.tokens or []
    assert len(tokens) == reply.usage.prompt_tokens
    values = choice.logprobs.token_logprobs or []
    assert values[0] is None and all(v is not None and v <= 0 for v in values[1:])


@pytest.mark.parametrize(("presence", "frequency", "repetition"),
                         [(1.5, 0.0, 1.0), (0.0, 1.2, 1.0), (0.0, 0.0, 2.0), (0.5, 0.3, 1.3)])
def test_penalties_match_vllm_formulas_token_for_token(
        client: OpenAI, model: str, oracle: Any, tokenizer: Any, presence: float,
        frequency: float, repetition: float) -> None:
    want = greedy_with_penalties(oracle, PROMPT, 16, presence, frequency, repetition)
    reply = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=16, temperature=0, presence_penalty=presence,
        frequency_penalty=frequency, logprobs=0,
        extra_body={"repetition_penalty": repetition, "ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == [tokenizer.decode([t]) for t in want]


def test_logit_bias_bad_words_and_min_p_are_honoured(
        client: OpenAI, model: str, oracle: Any, tokenizer: Any) -> None:
    plain = greedy(oracle, PROMPT, 6)
    forced = client.completions.create(model=model, prompt=PROMPT, max_tokens=4,
                                       temperature=0, logit_bias={"300": 100},
                                       extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tokenizer.decode([300] * 4)
    word = tokenizer.decode([plain[0]]).strip()
    assert word, "the first greedy token should be a word"
    banned = client.completions.create(model=model, prompt=PROMPT, max_tokens=6,
                                       temperature=0, logprobs=0,
                                       extra_body={"bad_words": [word], "ignore_eos": True})
    assert word not in (banned.choices[0].logprobs.tokens or [])[0]  # type: ignore[union-attr]
    # min_p 1 keeps only the most likely token: any seed samples the greedy text.
    sampled = client.completions.create(model=model, prompt=PROMPT, max_tokens=6,
                                        temperature=1.0, seed=11,
                                        extra_body={"min_p": 1.0, "ignore_eos": True})
    assert sampled.choices[0].text == tokenizer.decode(plain, skip_special_tokens=True)
