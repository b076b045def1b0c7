"""Tool-call parsers: a request's output text in, content and call deltas out.

One parser per request, fed the text the detokenizer releases (after stop
strings), in pieces of any size: the deltas it returns are the same however the
text was split, so a streamed and a buffered answer agree, and a replica that
takes a request over (replaying its text from the start) parses it alike.

Formats, by vLLM's ``--tool-call-parser`` names:

- ``hermes`` (Hermes 2 Pro, Qwen 2.5 / 3): ``<tool_call>{"name": "f",
  "arguments": {...}}</tool_call>``, any number, with content around them.
- ``llama3_json`` (Llama 3.1 / 3.2 JSON tool calling): the output is calls,
  ``{"name": "f", "parameters": {...}}`` (optionally after ``<|python_tag|>``,
  several separated by ``;``); output that starts otherwise is content.
- ``mistral``: ``[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`` (v3), or
  ``[TOOL_CALLS]f[ARGS]{...}`` / ``[TOOL_CALLS]f{...}`` (v11+), after content.

And the two formats structured outputs force (``tool_choice`` other than auto):

- ``required``: the output is a JSON array of ``{"name", "parameters"}`` objects.
- ``function``: the output is the arguments of the one named function.

Content is the text outside calls. Once a call began, whitespace between and
after calls is not content (the templates put newlines there). Text that turns
out not to be a call (malformed JSON, an object with no name) is content, unless
the call's name was already released: a stream cannot take it back, so the rest
of that call is dropped, as vLLM's streaming parsers do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.tokenizer.json_scan import WHITESPACE, CallObjectScanner, JsonValueScanner
from shared.protocol.tools import ToolCallDelta

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TAG, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"


@dataclass(slots=True)
class ParsedText:
    """What one piece of output text became."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


class ToolCallParser:
    """Base: content release (holding whitespace after calls), call deltas."""

    def __init__(self, parallel: bool = True) -> None:
        self._max_calls = None if parallel else 1
        self._out = ParsedText()
        self._calls = 0  # calls whose name was released
        self._held_ws: list[str] = []  # whitespace after a call: content only if text follows
        self._call_open = False  # a call's name was released, its end not seen yet
        self._args_released = 0
        self._muted = False  # a call past max_calls: parsed, not released

    @property
    def called(self) -> bool:
        """At least one call was released."""
        return self._calls > 0

    def push(self, text: str) -> ParsedText:
        for ch in text:
            self._feed(ch)
        return self._take()

    def finish(self) -> ParsedText:
        """The output ended: release what was held (a call cut short ends as it is)."""
        self._end()
        self._held_ws.clear()
        return self._take()

    def _feed(self, ch: str) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError

    def _take(self) -> ParsedText:
        out, self._out = self._out, ParsedText()
        return out

    # --- content ---------------------------------------------------------------

    def _content(self, text: str) -> None:
        if not text:
            return
        if self._calls and not text.strip(WHITESPACE):
            self._held_ws.append(text)
            return
        self._out.content += "".join(self._held_ws) + text
        self._held_ws.clear()

    # --- calls -----------------------------------------------------------------

    def _open_call(self, name: str) -> None:
        self._held_ws.clear()
        self._muted = self._max_calls is not None and self._calls >= self._max_calls
        self._call_open = True
        self._args_released = 0
        if not self._muted:
            self._out.calls.append(ToolCallDelta(self._calls, name=name))
            self._calls += 1

    def _arguments(self, text: str) -> None:
        if not text or self._muted:
            return
        index = self._calls - 1
        calls = self._out.calls
        if calls and calls[-1].index == index:
            last = calls[-1]
            calls[-1] = ToolCallDelta(index, last.name, last.arguments + text,
                                      last.arguments_offset)
        else:
            calls.append(ToolCallDelta(index, arguments=text,
                                       arguments_offset=self._args_released))
        self._args_released += len(text)

    def _close_call(self, had_arguments: bool) -> None:
        if not had_arguments:
            self._arguments("{}")
        self._call_open = False

    def _pump(self, scanner: CallObjectScanner) -> None:
        """Release what a call object's scanner learned: its name, then arguments."""
        if not self._call_open and scanner.name is not None and not scanner.failed:
            self._open_call(scanner.name)
        if self._call_open:
            self._arguments(scanner.take_arguments())
            if scanner.done:
                self._close_call(scanner.has_arguments)


class _ObjectSequence:
    """Raw text of call objects in progress, for the fallback to content."""

    def __init__(self) -> None:
        self.scanner = CallObjectScanner()
        self.raw: list[str] = []

    def new(self) -> CallObjectScanner:
        self.scanner = CallObjectScanner()
        self.raw = []
        return self.scanner


class _ObjectCallParser(ToolCallParser):
    """A parser whose calls are JSON objects scanned a character at a time. A call
    that turns out not to be one goes back to content (``_RAW_PREFIX``, the text that
    opened it, then its raw text) and the rest of the output is plain content."""

    _RAW_PREFIX = ""

    def __init__(self, parallel: bool, state: str) -> None:
        super().__init__(parallel)
        self._state = state
        self._held = ""  # text that may be the start of a tag or separator
        self._object = _ObjectSequence()
        self._then = state  # the state after a call object ends

    def _plain(self, text: str) -> None:
        self._held, self._state = "", "plain"
        self._content(text)

    def _open_object(self, then: str) -> None:
        self._then = then
        self._held, self._state = "", "call"
        self._object.new()

    def _begin_call(self, ch: str, then: str) -> None:
        self._open_object(then)
        self._feed_call(ch)

    def _feed_call(self, ch: str) -> None:
        scanner = self._object.scanner
        self._object.raw.append(ch)
        scanner.feed(ch)
        if scanner.failed:
            if not self._call_open:
                self._content(self._RAW_PREFIX + "".join(self._object.raw))
            self._call_open, self._state = False, "plain"
            return
        self._pump(scanner)
        if scanner.done:
            self._state, self._held = self._then, ""

    def _finish_call(self) -> bool:
        """The output ended inside a call object: close the call if it was released
        (True), else leave it to the caller (False)."""
        scanner = self._object.scanner
        scanner.end_of_text()
        self._pump(scanner)
        if not self._call_open:
            return False
        self._close_call(scanner.has_arguments or bool(self._args_released))
        return True

    def _unreleased_call_as_content(self) -> None:
        self._content(self._RAW_PREFIX + "".join(self._object.raw))


class HermesParser(_ObjectCallParser):
    """``<tool_call>{...}</tool_call>`` among content."""

    _RAW_PREFIX = HERMES_START

    def __init__(self, parallel: bool = True) -> None:
        super().__init__(parallel, "content")  # content | call | close | plain

    def _feed(self, ch: str) -> None:
        if self._state == "plain":
            self._content(ch)
        elif self._state == "content":
            self._held += ch
            if self._held.endswith(HERMES_START):
                self._content(self._held[: -len(HERMES_START)])
                self._open_object(then="close")
            else:
                keep = _partial_tag(self._held, HERMES_START)
                self._content(self._held[: len(self._held) - keep])
                self._held = self._held[len(self._held) - keep:]
        elif self._state == "call":
            self._feed_call(ch)
        else:  # close: whitespace, then </tool_call>
            self._held += ch
            body = self._held.lstrip(WHITESPACE)
            if body == HERMES_END:
                self._held, self._state = "", "content"
            elif not HERMES_END.startswith(body):
                # No closing tag: what follows the call is content again.
                held, self._held, self._state = self._held, "", "content"
                for c in held:
                    self._feed(c)

    def _end(self) -> None:
        if self._state == "content":
            self._content(self._held)
        elif self._state == "call" and not self._finish_call():
            self._unreleased_call_as_content()
        self._held = ""


class Llama3JsonParser(_ObjectCallParser):
    """Output that is calls: ``[<|python_tag|>]{"name", "parameters"}[; {...}]``."""

    def __init__(self, parallel: bool = True) -> None:
        super().__init__(parallel, "start")  # start | call | between | plain

    def _feed(self, ch: str) -> None:
        if self._state == "plain":
            self._content(ch)
        elif self._state == "start":
            self._held += ch
            body = self._held.lstrip(WHITESPACE)
            if body == PYTHON_TAG:
                self._held = ""
            elif not body or PYTHON_TAG.startswith(body):
                pass
            elif body[0] == "{":
                self._begin_call("{", then="between")
            else:
                self._plain(self._held)
        elif self._state == "call":
            self._feed_call(ch)
        elif ch in WHITESPACE or (ch == ";" and ";" not in self._held):
            self._held += ch
        elif ch == "{" and ";" in self._held:
            self._begin_call("{", then="between")
        else:
            self._plain(ch)

    def _end(self) -> None:
        if self._state == "start":
            self._content(self._held)
        elif self._state == "call" and not self._finish_call():
            self._unreleased_call_as_content()
        self._held = ""


class JsonArrayParser(_ObjectCallParser):
    """``[{"name", "parameters"|"arguments"}, ...]``: the ``required`` format, and
    Mistral's body after its tag. ``tag``: text that must come first ("" none);
    then content may follow, and another tag (Mistral repeats it)."""

    def __init__(self, parallel: bool = True, tag: str = "") -> None:
        # content | after_tag | array | call | next | name | value | plain
        super().__init__(parallel, "content" if tag else "after_tag")
        self._tag = tag
        self._value = JsonValueScanner()

    def _feed(self, ch: str) -> None:
        state = self._state
        if state == "plain":
            self._content(ch)
        elif state == "content":
            self._feed_content(ch)
        elif state == "call":
            self._feed_call(ch)
        elif state == "value":
            self._feed_value(ch)
        elif state == "name":
            self._feed_name(ch)
        elif ch in WHITESPACE:
            self._held += ch
        elif state == "after_tag":
            if ch == "[":
                self._state, self._held = "array", ""
            elif ch == "{":
                self._begin_call(ch, then="content")
            elif self._tag and (ch.isalnum() or ch in "_-."):
                self._state, self._held = "name", ch
            else:
                self._plain((self._tag if self._tag else "") + self._held + ch)
        elif state == "array" and ch == "{":
            self._begin_call(ch, then="next")
        elif state == "next" and ch == ",":
            self._state, self._held = "array", ""
        elif state in ("array", "next") and ch == "]":
            self._state, self._held = "content" if self._tag else "plain", ""
        else:
            self._plain(ch)

    def _feed_content(self, ch: str) -> None:
        self._held += ch
        if self._held.endswith(self._tag):
            self._content(self._held[: -len(self._tag)])
            self._held, self._state = "", "after_tag"
            return
        keep = _partial_tag(self._held, self._tag)
        self._content(self._held[: len(self._held) - keep])
        self._held = self._held[len(self._held) - keep:]

    def _feed_name(self, ch: str) -> None:
        self._held += ch
        if self._held.endswith(MISTRAL_ARGS) or ch == "{":
            name = self._held.removesuffix(MISTRAL_ARGS).removesuffix("{").strip(WHITESPACE)
            if not name or not all(c.isalnum() or c in "_-." for c in name):
                self._plain(self._tag + self._held)
                return
            self._open_call(name)
            self._state, self._held, self._value = "value", "", JsonValueScanner()
            if ch == "{":
                self._feed_value(ch)
        elif not (ch.isalnum() or ch in "_-.[]ARGS" or ch in WHITESPACE):
            self._plain(self._tag + self._held)

    def _feed_value(self, ch: str) -> None:
        if not self._value.started and ch in WHITESPACE:
            return
        consumed = self._value.feed(ch)
        if consumed:
            self._arguments(ch)
        if self._value.done:
            self._close_call(True)
            self._state, self._held = "content", ""
            if not consumed:  # a scalar ended before ch
                self._feed(ch)

    def _end(self) -> None:
        if self._state == "content":
            self._content(self._held)
        elif self._state == "call":
            self._finish_call()
        elif self._state == "value" and self._call_open:
            self._close_call(True)
        self._held = ""


class FunctionParser(ToolCallParser):
    """The whole output is the arguments of one named function (``tool_choice``
    naming it; structured outputs make the text its parameters' JSON)."""

    def __init__(self, function: str) -> None:
        super().__init__(parallel=False)
        self._function = function

    def _feed(self, ch: str) -> None:
        if not self._call_open:
            if ch in WHITESPACE:
                return
            self._open_call(self._function)
        self._arguments(ch)

    def _end(self) -> None:
        if not self._call_open:
            self._open_call(self._function)
        self._close_call(bool(self._args_released))


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


# --tool-call-parser names (vLLM's) and the two forced formats.
PARSERS = ("hermes", "llama3_json", "mistral")
FORCED = ("required", "function")


def parser_problem(name: str) -> str | None:
    """Why ``DetokenizeSpec.tool_parser`` ``name`` cannot be served ("" is no parser),
    or None: checked where a spec enters from a socket, before ``make_parser``."""
    if not name or name in PARSERS + FORCED:
        return None
    return (f"unknown tool call parser {name[:64]!r}; expected one of "
            f"{', '.join(PARSERS + FORCED)}")


def make_parser(name: str, function: str = "", parallel: bool = True) -> ToolCallParser:
    """The parser ``DetokenizeSpec.tool_parser`` names; ValueError for another name."""
    if name == "hermes":
        return HermesParser(parallel)
    if name == "llama3_json":
        return Llama3JsonParser(parallel)
    if name == "mistral":
        return JsonArrayParser(parallel, tag=MISTRAL_TAG)
    if name == "required":
        return JsonArrayParser(parallel)
    if name == "function":
        return FunctionParser(function)
    raise ValueError(parser_problem(name))


def detect_parser(chat_template: str | None) -> str:
    """The parser a model's chat template implies ("" when it shows no tool format):
    the format the template itself writes assistant calls in."""
    if not chat_template:
        return ""
    if HERMES_START in chat_template:
        return "hermes"
    if MISTRAL_TAG in chat_template:
        return "mistral"
    if PYTHON_TAG in chat_template or '"parameters": ' in chat_template:
        return "llama3_json"
    return ""


# Parsers whose marker is a special token in their models' tokenizers: the output
# must be decoded with special tokens kept, or the marker vanishes (vLLM's Mistral
# parser sets ``skip_special_tokens`` false too). Qwen's and Hermes' ``<tool_call>``
# are plain added tokens and Llama's calls are found without ``<|python_tag|>``.
NEEDS_SPECIAL_TOKENS = frozenset({"mistral"})
