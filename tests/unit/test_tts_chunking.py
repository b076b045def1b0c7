"""Sentence/clause chunking of tts input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.tts.chunking import split_text


def texts(text: str, max_chars: int = 300) -> list[str]:
    return [chunk.text for chunk in split_text(text, max_chars)]


def test_sentences_become_chunks_and_abbreviations_do_not_end_them() -> None:
    text = 'Hello world. Dr. Smith lives in St. Louis! Is pi 3.14? "Yes," he said. J. R. R. wrote'
    assert texts(text) == [
        "Hello world.", "Dr. Smith lives in St. Louis!", "Is pi 3.14?", '"Yes," he said.',
        "J. R. R. wrote",
    ]


def test_paragraphs_and_cjk_full_stops_end_chunks() -> None:
    assert texts("Line one\n\nLine two") == ["Line one", "Line two"]
    assert texts("第一句。第二句！第三") == ["第一句。", "第二句！", "第三"]


def test_long_sentences_are_cut_at_clauses_then_spaces_then_anywhere() -> None:
    clauses = "one two three, four five six; seven eight nine"
    assert texts(clauses, max_chars=20) == ["one two three,", "four five six;", "seven eight nine"]
    assert texts("alpha beta gamma delta", max_chars=11) == ["alpha beta", "gamma", "delta"]
    assert texts("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]


def test_nothing_to_say_gives_no_chunks() -> None:
    assert texts("  ... !? \n\n  ") == []
    assert texts("") == []


@given(st.text(alphabet=st.sampled_from("ab .,!?\n;:—"), max_size=300), st.integers(1, 40))
def test_chunks_are_bounded_ordered_and_point_into_the_input(text: str, max_chars: int) -> None:
    chunks = split_text(text, max_chars)
    previous_end = 0
    for chunk in chunks:
        assert 0 < len(chunk.text) <= max_chars
        assert text[chunk.start : chunk.end] == chunk.text
        assert chunk.start >= previous_end
        previous_end = chunk.end
    # Every letter of the input is in some chunk.
    assert "".join(c.text for c in chunks).count("a") == text.count("a")
