"""Chat templates: a model folder's Jinja template rendered the way transformers does.

Templates come from the Hub and are untrusted code, so they run in Jinja's
immutable sandbox. The environment mirrors ``transformers.apply_chat_template``
(trim_blocks, lstrip_blocks, loop controls, a ``tojson`` that does not escape HTML,
``raise_exception``, ``strftime_now``), because a template is written against that
environment and must render the same text here as in the reference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template could not render this conversation (its message is for the client)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & for HTML; prompts are not HTML.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def find_chat_template(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The folder's default chat template, wherever this folder's era put it:
    ``chat_template.jinja`` (transformers >= 4.43 saves it there), then
    ``tokenizer_config.json`` (a string, or a list of named templates), then
    ``chat_template.json`` (processor folders)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if template is None:
        json_file = model_dir / "chat_template.json"
        if json_file.is_file():
            template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def chat_template_option(value: str) -> str:
    """``--chat-template`` (``MESHSERVE_CHAT_TEMPLATE``), as vLLM takes it: the path of
    a template file, or the template itself inline."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(
        f"--chat-template {value!r}: no such file, and not an inline Jinja template "
        "(one has {{ ... }} or {% ... %})"
    )


class ChatTemplate:
    """A compiled chat template with the model's special tokens bound in."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the model's chat template does not compile: {e}") from e
        self._special_tokens = dict(special_tokens)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for ``messages`` (and ``tools``, each a JSON schema dict
        as transformers takes them); ``ChatTemplateError`` if the template refuses
        them (``raise_exception``) or fails while rendering."""
        try:
            return self._template.render(
                **self._special_tokens,
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=[dict(t) for t in tools] if tools else None,
                documents=None,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # A template indexing a message field that is not there, and the like.
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
