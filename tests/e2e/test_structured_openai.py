"""Structured outputs through the whole mesh with the unmodified ``openai`` client,
on the random-weight embedded model: a strict ``json_schema`` response validates
against its schema every time (several seeds and temperatures, chat and
completions, streamed and not), ``json_object`` parses, ``guided_choice`` returns
one of the choices, ``guided_regex`` matches, and a grammar that does not compile
is a 400 naming its field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.e2e.mesh import Mesh

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
        "coastal": {"type": "boolean"},
        "districts": {"type": "array", "items": {"type": "string", "enum": ["north", "south"]},
                      "maxItems": 4},
    },
    "required": ["city", "population", "coastal", "districts"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> OpenAI:
    return OpenAI(base_url=mesh.base_url + "/v1", api_key="unused", max_retries=0,
                  timeout=300)


@pytest.fixture(scope="module")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.mark.parametrize(("seed", "temperature"), [(0, 0.0), (1, 0.7), (2, 1.0), (3, 1.5)])
def test_json_schema_chat_validates_every_time(client: OpenAI, model: str, seed: int,
                                               temperature: float) -> None:
    response = client.chat.completions.create(
        model=model, messages=MESSAGES, response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
        seed=seed, temperature=temperature, max_tokens=200, n=2)
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_json_schema_streamed_and_on_completions(client: OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
        seed=5, temperature=1.0, max_tokens=200, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    completion = client.completions.create(
        model=model, prompt="City JSON:", max_tokens=200, seed=6, temperature=1.0,
        extra_body={"response_format": RESPONSE_FORMAT})
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)


def test_json_object_parses(client: OpenAI, model: str) -> None:
    for seed in range(3):
        response = client.chat.completions.create(
            model=model, messages=MESSAGES, response_format={"type": "json_object"},
            seed=seed, temperature=1.0, max_tokens=400)
        assert response.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(response.choices[0].message.content or ""), dict)


def test_guided_choice_and_regex(client: OpenAI, model: str) -> None:
    choices = ["positive", "negative", "neutral"]
    for seed in range(3):
        response = client.chat.completions.create(
            model=model, messages=MESSAGES, seed=seed, temperature=1.0, max_tokens=20,
            extra_body={"guided_choice": choices})
        assert response.choices[0].message.content in choices
    pattern = r"[A-Z][a-z]{2,8}-[0-9]{3}"
    completion = client.completions.create(
        model=model, prompt="Code:", max_tokens=30, seed=4, temperature=1.0,
        extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, completion.choices[0].text), completion.choices[0].text
    structured = client.completions.create(
        model=model, prompt="Code:", max_tokens=30, seed=4, temperature=1.0,
        extra_body={"structured_outputs": {"regex": pattern}})
    assert structured.choices[0].text == completion.choices[0].text  # same constraint


def test_a_grammar_that_does_not_compile_is_400_naming_its_field(client: OpenAI,
                                                                 model: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5,
                                       extra_body={"guided_regex": "a(b"})
    assert "guided_regex" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as odd:
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=5,
            response_format={"type": "json_schema",  # type: ignore[arg-type]
                             "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert "response_format.json_schema" in str(odd.value)
