"""A plain-text progress bar on stderr (no dependency): redrawn in place on a
terminal, a line per tenth of the run when stderr is a file or a pipe."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
REDRAW_EVERY_S = 0.1


class ProgressBar:
    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self._start = time.perf_counter()
        self._drawn_at = 0.0
        self._tenths_shown = 0
        self._tty = self.stream.isatty()

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if not self.enabled:
            return
        if self._tty:
            now = time.perf_counter()
            if now - self._drawn_at >= REDRAW_EVERY_S or self.done == self.total:
                self._drawn_at = now
                self.stream.write("\r" + self.line())
                self.stream.flush()
        elif (tenths := 10 * self.done // self.total) > self._tenths_shown:
            self._tenths_shown = tenths
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        filled = WIDTH * self.done // self.total
        elapsed = time.perf_counter() - self._start
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] "
                f"{self.done}/{self.total}{failed} {elapsed:.1f}s")

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
