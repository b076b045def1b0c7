"""Split input text into the chunks a tts replica synthesizes and streams one by one.

A chunk is a sentence; a sentence longer than ``max_chars`` is cut at clause marks
(``, ; :`` and spaced dashes), then at the last space before the limit, and only as a
last resort mid-word. Sentence ends are where a listener expects a pause anyway, so
synthesizing them separately (each with its end pause) sounds like synthesizing the
whole text, while the first chunk's audio can stream long before the last one is done.

Chunks keep their offsets into the input, and chunks with nothing to say
(punctuation, whitespace) are dropped.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

DEFAULT_MAX_CHARS = 300

# A terminator run, closing quotes/brackets, then whitespace or the end of the text.
# CJK full stops need no space after them.
_SENTENCE_END = re.compile(r"""[.!?…]+["'”’)\]]*(?=\s|$)|[。！？]+["'”’)\]」』]*|\n[ \t]*\n""")
_CLAUSE_END = re.compile(r"""[,;:]["'”’)\]]*(?=\s)|\s[–—-]{1,2}(?=\s)|[、，；：]""")
# Words after which a period usually does not end a sentence.
_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e",
    "fig", "no", "nos", "inc", "ltd", "co", "corp", "approx", "dept", "est",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
))
_WORD_BEFORE = re.compile(r"([\w.]+)$")


@dataclass(frozen=True, slots=True)
class TextChunk:
    """``text`` is ``input[start:end]`` with surrounding whitespace removed."""

    text: str
    start: int
    end: int


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the period at ``text[dot]`` follows an abbreviation or an initial."""
    word = _WORD_BEFORE.search(text, 0, dot)
    if word is None:
        return False
    token = word.group(1).lower()
    return token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha())


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        terminator = match.group(0)
        if terminator == "." and _is_abbreviation(text, match.start()):
            continue
        spans.append((start, match.end()))
        start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _cut_long(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Cut ``text[start:end]`` into pieces of at most ``max_chars``, preferring clause
    ends, then spaces."""
    pieces: list[tuple[int, int]] = []
    while end - start > max_chars:
        limit = start + max_chars
        cut = -1
        for clause in _CLAUSE_END.finditer(text, start, limit):
            cut = clause.end()
        if cut <= start:
            space = text.rfind(" ", start + 1, limit)
            cut = space if space > start else limit
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def _speakable(text: str) -> bool:
    return any(not (ch.isspace() or unicodedata.category(ch).startswith("P")) for ch in text)


def split_text(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[TextChunk]:
    """The chunks of ``text`` in order; empty when nothing in it can be spoken."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    chunks: list[TextChunk] = []
    for sentence_start, sentence_end in _sentence_spans(text):
        for start, end in _cut_long(text, sentence_start, sentence_end, max_chars):
            piece = text[start:end]
            stripped = piece.strip()
            if not stripped or not _speakable(stripped):
                continue
            lead = len(piece) - len(piece.lstrip())
            chunks.append(TextChunk(stripped, start + lead, start + lead + len(stripped)))
    return chunks
