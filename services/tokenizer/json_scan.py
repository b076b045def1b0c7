"""Incremental JSON scanning for tool calls: text arrives a few characters at a
time and a call's arguments must stream out as they arrive, before the JSON ends.

Two pure scanners, fed one character at a time:

- ``JsonValueScanner``: where one JSON value ends (strings, containers, scalars);
  its raw text is the value's text exactly as the model wrote it.
- ``CallObjectScanner``: one object describing a call, ``{"name": "f",
  "arguments": {...}}`` (the arguments key is ``parameters`` in Llama 3's format):
  the name once its string is complete, and the arguments' raw text fragment by
  fragment. Other keys are skipped.

They check structure (brackets, strings, separators), not every detail of a number
or a literal: a model's call with a malformed scalar still streams, as vLLM's
partial-JSON parsing lets it. Anything that is not a JSON object marks the scanner
``failed`` and the parser falls back to plain content.
"""

from __future__ import annotations

import enum
import json

WHITESPACE = " \t\n\r"
ARGUMENT_KEYS = ("arguments", "parameters")


class JsonValueScanner:
    """The extent of one JSON value, fed character by character."""

    def __init__(self) -> None:
        self._kind = ""  # "string", "container" or "scalar" once the value started
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.done = False

    @property
    def started(self) -> bool:
        return bool(self._kind)

    def feed(self, ch: str) -> bool:
        """True if ``ch`` is part of the value. False only for the character after a
        scalar (a scalar has no closing mark): the value is done without it."""
        assert not self.done, "value already complete"
        if not self._kind:
            self._start(ch)
            return True
        if self._kind == "scalar":
            if ch in WHITESPACE or ch in ",}]":
                self.done = True
                return False
            return True
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
                self.done = self._kind == "string"
            return True
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            self.done = self._depth == 0
        return True

    def _start(self, ch: str) -> None:
        if ch == '"':
            self._kind, self._in_string = "string", True
        elif ch in "{[":
            self._kind, self._depth = "container", 1
        else:
            self._kind = "scalar"


class _At(enum.Enum):
    OPEN = "open"  # before the object's "{"
    KEY = "key"  # before a key (or the closing "}")
    IN_KEY = "in_key"
    COLON = "colon"
    VALUE = "value"  # in (or before) a value
    NEXT = "next"  # after a value: "," or "}"
    DONE = "done"
    FAILED = "failed"


class CallObjectScanner:
    """One call object, fed character by character.

    ``name`` is set once the name's string is complete; ``take_arguments`` returns
    the arguments' raw text that arrived since the last call (the value of the
    first of ``ARGUMENT_KEYS`` present). ``done`` once the closing brace came;
    ``failed`` if the text is not such an object.
    """

    def __init__(self) -> None:
        self._at = _At.OPEN
        self._key: list[str] = []
        self._key_escaped = False
        self._current_key = ""
        self._value: JsonValueScanner | None = None
        self._value_text: list[str] = []  # the name's raw string, while it arrives
        self._arguments: list[str] = []
        self.name: str | None = None
        self.has_arguments = False
        self.arguments_complete = False

    @property
    def done(self) -> bool:
        return self._at is _At.DONE

    @property
    def failed(self) -> bool:
        return self._at is _At.FAILED

    @property
    def started(self) -> bool:
        return self._at is not _At.OPEN

    def take_arguments(self) -> str:
        text = "".join(self._arguments)
        self._arguments.clear()
        return text

    def feed(self, ch: str) -> bool:
        """Consume ``ch``; False if the object had already ended (``ch`` is not
        part of it) or the scanner failed."""
        at = self._at
        if at is _At.DONE or at is _At.FAILED:
            return False
        if at is _At.VALUE:
            return self._feed_value(ch)
        if at is _At.IN_KEY:
            self._feed_key(ch)
            return True
        if ch in WHITESPACE:
            return True
        expected = {_At.OPEN: "{", _At.KEY: '"}', _At.COLON: ":", _At.NEXT: ",}"}[at]
        if ch not in expected:
            self._at = _At.FAILED
            return False
        if ch == "{":
            self._at = _At.KEY
        elif ch == '"':
            self._at, self._key = _At.IN_KEY, []
        elif ch == ":":
            self._at, self._value, self._value_text = _At.VALUE, JsonValueScanner(), []
        elif ch == ",":
            self._at = _At.KEY
        elif self.name is None:  # "}" of an object that named no function
            self._at = _At.FAILED
            return False
        else:
            self._at = _At.DONE
        return True

    def _feed_key(self, ch: str) -> None:
        if self._key_escaped:
            self._key_escaped = False
        elif ch == "\\":
            self._key_escaped = True
        elif ch == '"':
            self._current_key = _json_string("".join(self._key)) or ""
            self._at = _At.COLON
            return
        self._key.append(ch)

    def _feed_value(self, ch: str) -> bool:
        value = self._value
        assert value is not None
        if not value.started and ch in WHITESPACE:
            return True
        is_arguments = self._current_key in ARGUMENT_KEYS and not self.has_arguments
        if not value.feed(ch):  # a scalar ended before ch: ch belongs to the object
            self._end_value(is_arguments)
            return self.feed(ch)
        if is_arguments:
            self._arguments.append(ch)
        elif self._current_key == "name":
            self._value_text.append(ch)
        if value.done:
            self._end_value(is_arguments)
        return True

    def _end_value(self, is_arguments: bool) -> None:
        self._at = _At.NEXT
        if is_arguments:
            self.has_arguments = self.arguments_complete = True
        elif self._current_key == "name" and self.name is None:
            raw = "".join(self._value_text)
            name = _json_string(raw[1:-1]) if raw.startswith('"') and len(raw) > 1 else None
            if not name:
                self._at = _At.FAILED
            self.name = name

    def end_of_text(self) -> None:
        """The text ended: a scalar value in progress is complete."""
        if self._at is _At.VALUE and self._value is not None and self._value.started:
            self._end_value(self._current_key in ARGUMENT_KEYS and not self.has_arguments)


def _json_string(body: str) -> str | None:
    """The value of a JSON string's body (between its quotes); None if malformed."""
    try:
        value = json.loads('"' + body + '"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None
