"""Structured-output fields of a request body -> its grammar (or a 400 naming the
field): response_format, vLLM's structured_outputs and guided_* fields."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest
from tokenizers import Tokenizer

from services.tokenizer.grammar_check import GrammarCheck
from shared.embedded_model import ensure_embedded_model
from shared.grammar import grammar_error, json_schema_grammar
from tests.unit.test_api_generation_plan import chat, completion, error_of

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(("make", "body", "field"), [
    (chat, {"response_format": {"type": "json_object"}}, "response_format"),
    (completion, {"response_format": {"type": "json_object"}}, "response_format"),
    (chat, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": SCHEMA, "strict": True}}}, "response_format.json_schema"),
    (completion, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": SCHEMA}}}, "response_format.json_schema"),
    (chat, {"structured_outputs": {"json": SCHEMA}}, "structured_outputs.json"),
    (chat, {"structured_outputs": {"regex": "[0-9]+"}}, "structured_outputs.regex"),
    (completion, {"structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs.choice"),
    (chat, {"structured_outputs": {"grammar": 'root ::= "x"'}}, "structured_outputs.grammar"),
    (chat, {"structured_outputs": {"json_object": True}}, "structured_outputs.json_object"),
    (completion, {"guided_json": json.dumps(SCHEMA)}, "guided_json"),
    (chat, {"guided_regex": "a|b"}, "guided_regex"),
    (chat, {"guided_choice": ["yes", "no"], "guided_decoding_backend": "xgrammar"},
     "guided_choice"),
    (completion, {"guided_grammar": 'start: "x"+'}, "guided_grammar"),
])
def test_each_spelling_becomes_a_grammar_that_compiles(make: Any, body: dict[str, Any],
                                                       field: str) -> None:
    sampling = make(**body).sampling
    assert sampling.grammar_field == field
    tokenizer = llguidance.LLTokenizer(str(ensure_embedded_model() / "tokenizer.json"))
    assert grammar_error(sampling.grammar, tokenizer) == ""


def test_no_constraint_and_text_format_carry_no_grammar() -> None:
    assert chat().sampling.grammar == ""
    assert chat(response_format={"type": "text"}).sampling.grammar == ""


@pytest.mark.parametrize(("make", "body", "param"), [
    (chat, {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (chat, {"response_format": {"type": "structural_tag"}}, "response_format"),
    (chat, {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    (chat, {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    (chat, {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    (chat, {"structured_outputs": {}}, "structured_outputs"),
    (chat, {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    (chat, {"guided_choice": []}, "guided_choice"),
    (chat, {"guided_choice": [""]}, "guided_choice"),
    (completion, {"guided_json": "{not json"}, "guided_json"),
    (completion, {"guided_grammar": "root ::= ("}, "guided_grammar"),
])
def test_malformed_constraints_are_400_naming_the_field(make: Any, body: dict[str, Any],
                                                        param: str) -> None:
    error = error_of(make, **body)
    assert error.status == 400 and error.param == param, (error.status, error.param)


def test_compact_json_unless_whitespace_is_asked_for() -> None:
    compact = json.loads(json_schema_grammar(SCHEMA))["grammars"][0]["json_schema"]
    assert compact["x-guidance"] == {"whitespace_flexible": False}
    spaced = chat(structured_outputs={"json": SCHEMA, "whitespace_pattern": " ?"}).sampling
    options = json.loads(spaced.grammar)["grammars"][0]["json_schema"]["x-guidance"]
    assert options["whitespace_pattern"] == " ?"


def test_disable_additional_properties_closes_every_object() -> None:
    nested = {"type": "object", "properties": {"inner": {"type": "object"},
                                               "enum": {"enum": [{"k": 1}]}}}
    sampling = chat(structured_outputs={"json": nested,
                                        "disable_additional_properties": True}).sampling
    schema = json.loads(sampling.grammar)["grammars"][0]["json_schema"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["inner"]["additionalProperties"] is False
    assert schema["properties"]["enum"]["enum"] == [{"k": 1}]  # values untouched


def test_the_tokenizer_check_names_errors_and_caches_verdicts() -> None:
    folder = ensure_embedded_model()
    check = GrammarCheck(Tokenizer.from_file(str(folder / "tokenizer.json")), 2048)
    bad = chat(guided_regex="a(b").sampling.grammar  # unclosed group: only a compile sees it
    unknown = chat(guided_json={"type": "nonsense"}).sampling.grammar
    good = chat(guided_json=SCHEMA).sampling.grammar
    assert check.cached(bad) is None
    assert "unclosed group" in check.check(bad)
    assert "nonsense" in check.check(unknown)
    assert check.check(good) == ""
    assert check.cached(good) == "" and "unclosed group" in (check.cached(bad) or "")
