"""The grammar a constrained request carries (``SamplingParams.grammar``).

A grammar is llguidance's grammar JSON (``{"grammars": [...]}``, a string): built
once by the api from what the client sent (a JSON schema, a regex, choices, a Lark
or GBNF grammar), validated and compiled against the model's tokenizer by the
tokenizer replica at admission (a bad one is a 400 there), and compiled again by
the worker, which owns the matcher that masks the request's logits each step. The
string is the cache key of both compilers, so equal schemas compile once.

Every builder here raises ``GrammarError`` for input it cannot turn into a grammar
(e.g. a schema that is not a JSON object); semantic errors (an unknown schema
keyword, an unclosed regex group) surface from ``grammar_error``, the check the
tokenizer runs.

JSON is compact by default (no free whitespace between tokens, ``","`` and
``":"``): with vLLM's default (any whitespace anywhere) a small or undertrained
model pads its JSON with whitespace until ``max_tokens``. ``whitespace_pattern``
(vLLM's field) brings whitespace back where a client wants it.

Tool calling uses ``json_schema_grammar`` for a function's ``parameters`` and
``lark_grammar`` for a whole tool-call format (llguidance's Lark embeds a schema
with ``%json { ... }``).
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

# Any JSON object: OpenAI's ``response_format: {"type": "json_object"}``.
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """Client input that is not a grammar; the message says what is wrong."""


def json_schema_grammar(
    schema: dict[str, Any] | str,
    *,
    whitespace_pattern: str | None = None,
    no_additional_properties: bool = False,
) -> str:
    """The grammar of JSON documents valid under ``schema`` (a dict, or its JSON
    text). ``no_additional_properties``: objects that do not say otherwise get
    ``additionalProperties: false`` (vLLM's ``disable_additional_properties``)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    if no_additional_properties:
        schema = _closed_objects(schema)
    options: dict[str, Any] = {"whitespace_flexible": False}
    if whitespace_pattern is not None:
        options = {"whitespace_flexible": True, "whitespace_pattern": whitespace_pattern}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from e


def json_object_grammar(*, whitespace_pattern: str | None = None) -> str:
    """Any JSON object (OpenAI's ``json_object`` mode)."""
    return json_schema_grammar(ANY_JSON_OBJECT, whitespace_pattern=whitespace_pattern)


def regex_grammar(pattern: str) -> str:
    """Text matching the whole ``pattern`` (Rust regex syntax, as vLLM's guidance)."""
    return llguidance.grammar_from("regex", pattern)


def choice_grammar(choices: list[str]) -> str:
    """Exactly one of ``choices``."""
    if not choices:
        raise GrammarError("choices must not be empty")
    return llguidance.grammar_from("choice", json.dumps(choices))


def lark_grammar(grammar: str) -> str:
    """A context-free grammar in llguidance's Lark dialect or in GBNF (llama.cpp's,
    what vLLM's ``guided_grammar`` takes); its start rule is ``start`` / ``root``."""
    try:
        return llguidance.grammar_from("grammar", grammar)
    except ValueError as e:
        raise GrammarError(str(e)) from e


# A grammar's size, at most: compiling one is native work that a huge, fuzzed or
# hostile schema can stretch for a long time, and the services run it in a thread
# of their event loop's process.
MAX_GRAMMAR_CHARS = 64 * 1024


def grammar_error(grammar: str, tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """Why ``grammar`` cannot be compiled (for ``tokenizer`` when given: that also
    checks tokens it names), or "" when it can. Compiles it: as costly as building
    a matcher (milliseconds for common schemas, more for huge ones)."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        return f"the grammar is {len(grammar)} characters long; at most {MAX_GRAMMAR_CHARS}"
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    return messages[0] if is_error else ""


def _closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that
    does not set it (walks subschemas; leaves ``properties`` names alone)."""
    if isinstance(schema, list):
        return [_closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("enum", "const", "default", "examples"):
            out[key] = value  # values, not schemas
        elif key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = ({k: _closed_objects(v) for k, v in value.items()}
                        if isinstance(value, dict) else value)
        else:
            out[key] = _closed_objects(value)
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
