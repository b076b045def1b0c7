"""Stop strings over streamed text: cut at the first match, never leak a partial one.

Text arrives in arbitrary chunks. A stop string may be split across chunks, so the
matcher holds back the longest tail of not-yet-released text that is a proper prefix
of some stop string; that tail is released only once it can no longer grow into a
match (or when the stream ends). Invariant: a match always starts inside the held
text, because every position where a stop string could still begin is held.

Which match is "first" does not depend on how the text was chunked: it is the
match that *ends* earliest (what a character-by-character stream would see first);
among matches ending at the same place, the one starting earliest (the longest).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Filters a stream of text through a set of stop strings. Pure, no I/O.

    ``push`` returns the text that can be released now; after a match,
    ``matched`` is the stop string that ended the stream and every later call
    returns "".
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        # An empty stop string would match before any text: meaningless, ignored.
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        self._include = include_stop_str_in_output
        # Every proper prefix of every stop string: a held tail must be one of these.
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._pending = ""
        self.matched: str | None = None

    @property
    def active(self) -> bool:
        return bool(self._stops)

    @property
    def held(self) -> str:
        """Text received but not released yet (a possible start of a stop string)."""
        return self._pending

    def push(self, text: str) -> str:
        """Add streamed text; return what may be released now."""
        if self.matched is not None:
            return ""
        if not self._stops:
            return text
        pending = self._pending + text
        match = self._first_match(pending)
        if match is not None:
            stop, start = match
            self.matched = stop
            self._pending = ""
            return pending[: start + len(stop)] if self._include else pending[:start]
        hold = self._longest_held_tail(pending)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        """The stream ended: what was held can no longer become a match."""
        released, self._pending = self._pending, ""
        return "" if self.matched is not None else released

    def _first_match(self, text: str) -> tuple[str, int] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        return best[2], best[1]

    def _longest_held_tail(self, text: str) -> int:
        for length in range(min(len(text), self._max_hold), 0, -1):
            if text[len(text) - length :] in self._prefixes:
                return length
        return 0
