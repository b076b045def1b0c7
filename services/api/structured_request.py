"""Structured outputs in a request body -> the request's grammar.

Three spellings say the same thing, and a request may use only one of them:

- OpenAI's ``response_format``: ``{"type": "json_object"}`` (any JSON object) or
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``;
  ``"text"`` means no constraint. Chat and completions, as vLLM accepts.
- vLLM's ``structured_outputs``: exactly one of ``json`` (a schema), ``regex``,
  ``choice``, ``grammar`` (Lark or GBNF), ``json_object``; with
  ``whitespace_pattern`` and ``disable_additional_properties``.
- vLLM's older ``guided_json``, ``guided_regex``, ``guided_choice``,
  ``guided_grammar`` (``guided_whitespace_pattern``; ``guided_decoding_backend``
  is accepted whatever it names: llguidance enforces the same constraint).

The grammar is built here (shared/grammar.py); whether it compiles is checked by
the tokenizer replica against the model's tokenizer, whose 400 names the field
recorded here in ``SamplingParams.grammar_field``. ``strict`` needs nothing more:
the output always follows the schema (OpenAI's strict subset is a subset of what
llguidance accepts). JSON is compact (no free whitespace) unless a
``whitespace_pattern`` asks for some: vLLM's ``disable_any_whitespace`` is the
default here, because a small model otherwise pads JSON with whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.api.errors import bad_request
from services.api.openai_schema import ResponseFormat, SamplingFields, StructuredOutputs
from shared.grammar import (
    GrammarError,
    choice_grammar,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)


@dataclass(frozen=True, slots=True)
class Constraint:
    """One structured-output request: which field, what kind, its value."""

    field: str
    kind: str  # "json", "json_object", "regex", "choice", "grammar"
    value: Any = None


def structured_grammar(body: SamplingFields,
                       response_format: ResponseFormat | None) -> tuple[str, str]:
    """(grammar, field it came from), ("", "") when the request has no constraint.
    Raises ``ApiError`` 400 naming the field for anything not a valid constraint."""
    found = [c for c in (_from_response_format(response_format),
                         _from_structured_outputs(body.structured_outputs),
                         _from_guided(body)) if c is not None]
    if not found:
        return "", ""
    if len(found) > 1:
        raise bad_request(f"`{found[0].field}` and `{found[1].field}` both constrain the "
                          "output; use one", found[1].field)
    constraint = found[0]
    whitespace, closed = _json_options(body)
    try:
        return _build(constraint, whitespace, closed), constraint.field
    except GrammarError as e:
        raise bad_request(f"`{constraint.field}`: {e}", constraint.field) from e


def _build(constraint: Constraint, whitespace: str | None, closed: bool) -> str:
    match constraint.kind:
        case "json":
            return json_schema_grammar(constraint.value, whitespace_pattern=whitespace,
                                       no_additional_properties=closed)
        case "json_object":
            return json_object_grammar(whitespace_pattern=whitespace)
        case "regex":
            return regex_grammar(constraint.value)
        case "choice":
            if any(not isinstance(c, str) or not c for c in constraint.value):
                raise GrammarError("choices must be non-empty strings")
            return choice_grammar(constraint.value)
        case _:
            return lark_grammar(constraint.value)


def _from_response_format(response_format: ResponseFormat | None) -> Constraint | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Constraint("response_format", "json_object")
    if response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None or spec.json_schema is None:
            raise bad_request("`response_format` of type 'json_schema' needs "
                              "`json_schema.schema`", "response_format.json_schema")
        return Constraint("response_format.json_schema", "json", spec.json_schema)
    raise bad_request(f"`response_format` {response_format.type!r} is not supported; "
                      "use 'text', 'json_object' or 'json_schema'", "response_format")


def _from_structured_outputs(spec: StructuredOutputs | None) -> Constraint | None:
    if spec is None:
        return None
    if spec.structural_tag is not None:
        raise bad_request("`structured_outputs.structural_tag` is not supported",
                          "structured_outputs.structural_tag")
    given = [Constraint(f"structured_outputs.{name}", name, value)
             for name, value in (("json", spec.json), ("regex", spec.regex),
                                 ("choice", spec.choice), ("grammar", spec.grammar))
             if value is not None]
    if spec.json_object:
        given.append(Constraint("structured_outputs.json_object", "json_object"))
    if len(given) != 1:
        raise bad_request("`structured_outputs` needs exactly one of json, regex, choice, "
                          f"grammar, json_object; got {len(given)}", "structured_outputs")
    return given[0]


def _from_guided(body: SamplingFields) -> Constraint | None:
    given = [Constraint(f"guided_{kind}", kind, value)
             for kind, value in (("json", body.guided_json), ("regex", body.guided_regex),
                                 ("choice", body.guided_choice),
                                 ("grammar", body.guided_grammar))
             if value is not None]
    if len(given) > 1:
        raise bad_request(f"`{given[0].field}` and `{given[1].field}` both constrain the "
                          "output; use one", given[1].field)
    return given[0] if given else None


def _json_options(body: SamplingFields) -> tuple[str | None, bool]:
    """(whitespace pattern or None for compact JSON, close objects to extra keys)."""
    spec = body.structured_outputs
    if spec is not None:
        pattern = spec.whitespace_pattern
        if spec.disable_any_whitespace:
            pattern = None
        return pattern, spec.disable_additional_properties
    return body.guided_whitespace_pattern, False
