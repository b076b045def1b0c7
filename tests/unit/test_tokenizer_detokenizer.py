"""Incremental detokenization and stop strings on the embedded byte-level BPE
tokenizer, which splits emoji and CJK characters over several tokens.

The central property: whatever way the ids are chunked, the concatenated text
equals the full decode cut at the first stop string, and no piece released before
the end ever holds a broken character or text past the cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from services.tokenizer.detokenizer import IncrementalDecoder, RequestDetokenizer
from services.tokenizer.stop_strings import StopStringMatcher
from shared.embedded_model import ensure_embedded_model
from shared.protocol.generation import DetokenizeSpec

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(ensure_embedded_model() / "tokenizer.json"))


_TOKENIZER: Tokenizer | None = None


def shared_tokenizer() -> Tokenizer:
    # Hypothesis tests cannot take function-scoped fixtures per example.
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = Tokenizer.from_file(str(ensure_embedded_model() / "tokenizer.json"))
    return _TOKENIZER


def expected_text(full: str, stop: Sequence[str], include: bool) -> tuple[str, str | None]:
    """The reference: ``full`` cut at the stop match that ends first (ties: the
    longest), independent of any chunking."""
    best: tuple[int, int, str] | None = None
    for s in stop:
        if not s:
            continue
        start = full.find(s)
        if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
            best = (start + len(s), start, s)
    if best is None:
        return full, None
    end, start, s = best
    return (full[:end] if include else full[:start]), s


def stream(
    detok: RequestDetokenizer, ids: Sequence[int], chunks: Sequence[int] = ()
) -> tuple[list[str], str]:
    """Feed ids (one at a time, or in the given chunk sizes); pieces and the final flush."""
    pieces: list[str] = []
    i = 0
    sizes = list(chunks) or [1] * len(ids)
    for size in sizes:
        if i >= len(ids):
            break
        text, _ = detok.push_many(ids[i : i + size])
        pieces.append(text)
        i += size
    if i < len(ids):
        pieces.append(detok.push_many(ids[i:])[0])
    return pieces, detok.finish()


def test_multibyte_characters_are_never_split(tokenizer: Tokenizer) -> None:
    text = "emoji 😀👍🏽 and 日本語のテキスト, done"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text.split())  # the characters really span several tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "" in pieces  # something was held back while a character was open
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text


def test_many_ids_at_once_release_the_text_before_an_open_character(
    tokenizer: Tokenizer,
) -> None:
    ids = tokenizer.encode("abc 😀").ids
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.push_many(ids[:-1]) == "abc "
    assert decoder.pending_ids == 3
    assert decoder.push_many(ids[-1:]) == "😀"


def test_prompt_context_does_not_change_the_text(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("the prompt ends in 日本").ids
    ids = tokenizer.encode(" and the output 語 continues").ids
    decoder = IncrementalDecoder(tokenizer, prompt)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == tokenizer.decode(ids)


def test_prompt_ending_in_a_broken_character_is_not_used_as_context(
    tokenizer: Tokenizer,
) -> None:
    emoji = tokenizer.encode("😀").ids
    assert len(emoji) > 1
    prompt = tokenizer.encode("abc").ids + emoji[:1]
    ids = tokenizer.encode("xyz").ids
    decoder = IncrementalDecoder(tokenizer, prompt)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "xyz"


def test_incomplete_tail_is_released_at_the_end_as_a_full_decode_shows_it(
    tokenizer: Tokenizer,
) -> None:
    ids = tokenizer.encode("ok 😀").ids[:-1]  # the emoji's last byte never comes
    decoder = IncrementalDecoder(tokenizer)
    released = "".join(decoder.push(i) for i in ids)
    assert released == "ok "
    tail = decoder.flush()
    assert released + tail == tokenizer.decode(ids) and tail.endswith(REPLACEMENT)
    assert decoder.flush() == ""


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer: Tokenizer, skip: bool) -> None:
    ids = tokenizer.encode("a<|im_end|>b<|im_start|>c").ids
    detok = RequestDetokenizer(tokenizer, [], DetokenizeSpec(skip_special_tokens=skip))
    pieces, tail = stream(detok, ids)
    assert "".join(pieces) + tail == ("abc" if skip else "a<|im_end|>b<|im_start|>c")


def test_stop_string_split_across_tokens_never_leaks(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("stop here STOP now").ids
    # "STOP" is four tokens: 'ĠS', 'T', 'O', 'P'.
    detok = RequestDetokenizer(tokenizer, [], DetokenizeSpec(stop=["STOP"]))
    released = ""
    consumed = 0
    while not detok.stopped:
        released += detok.push(ids[consumed])
        consumed += 1
        assert "S" not in released.removeprefix("stop here")  # nothing of the stop leaks
    assert detok.stop_string == "STOP"
    assert released == "stop here "
    # It stopped on the very token that completed the match.
    assert ids[consumed - 1] == tokenizer.token_to_id("P")
    assert detok.push(ids[-1]) == "" and detok.finish() == ""


def test_stop_string_kept_when_asked(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("stop here STOP now").ids
    spec = DetokenizeSpec(stop=["STOP"], include_stop_str_in_output=True)
    pieces, tail = stream(RequestDetokenizer(tokenizer, [], spec), ids)
    assert "".join(pieces) + tail == "stop here STOP"


def test_stop_string_inside_a_multibyte_run(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("日本語 END 😀😀 more").ids
    spec = DetokenizeSpec(stop=["😀😀"])
    pieces, tail = stream(RequestDetokenizer(tokenizer, [], spec), ids)
    assert "".join(pieces) + tail == "日本語 END "


def test_held_prefix_is_released_when_generation_ends(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("value: ##").ids
    detok = RequestDetokenizer(tokenizer, [], DetokenizeSpec(stop=["###"]))
    pieces, tail = stream(detok, ids)
    assert "".join(pieces) == "value: "  # "##" may still become "###": held
    assert tail == "##" and not detok.stopped


def test_stop_match_completed_by_the_final_flush(tokenizer: Tokenizer) -> None:
    # The stop string ends in an incomplete character: only the flush's U+FFFD
    # completes it, and it must still cut the text.
    ids = tokenizer.encode("ok 😀").ids[:-1]
    detok = RequestDetokenizer(tokenizer, [], DetokenizeSpec(stop=["ok " + REPLACEMENT]))
    pieces, tail = stream(detok, ids)
    assert "".join(pieces) + tail == "" and detok.stopped


class TestStopStringMatcher:
    def test_no_stops_is_a_pass_through(self) -> None:
        matcher = StopStringMatcher([])
        assert matcher.push("abc") == "abc" and matcher.flush() == ""

    def test_overlapping_prefix_is_held_exactly(self) -> None:
        matcher = StopStringMatcher(["aab"])
        assert matcher.push("aa") == ""
        assert matcher.push("a") == "a"  # "aaa": only "aa" can still start "aab"
        assert matcher.push("b") == "" and matcher.matched == "aab"

    def test_match_that_ends_first_wins_regardless_of_chunking(self) -> None:
        for chunks in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
            matcher = StopStringMatcher(["abcd", "bc"])
            released = "".join(matcher.push(c) for c in chunks)
            assert released == "a" and matcher.matched == "bc", chunks

    def test_same_end_prefers_the_longer_stop(self) -> None:
        matcher = StopStringMatcher(["c", "abc"], include_stop_str_in_output=True)
        assert matcher.push("xabcz") == "xabc" and matcher.matched == "abc"

    def test_empty_stop_strings_are_ignored(self) -> None:
        matcher = StopStringMatcher(["", "end"])
        assert matcher.push("text") == "text" and matcher.matched is None

    def test_nothing_after_a_match(self) -> None:
        matcher = StopStringMatcher(["x"])
        assert matcher.push("axb") == "a"
        assert matcher.push("more") == "" and matcher.flush() == ""


# ---- properties -------------------------------------------------------------

ALPHABET = st.sampled_from(
    [*"abcdefg XYZ.,\n#", "é", "ß", "日", "本", "語", "😀", "👍🏽", "🤔", "<|im_end|>"]
)
TEXTS = st.lists(ALPHABET, min_size=0, max_size=40).map("".join)


@st.composite
def text_and_stops(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(TEXTS)
    stops: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        if text and draw(st.booleans()):
            start = draw(st.integers(0, len(text) - 1))
            stops.append(text[start : start + draw(st.integers(1, 6))])
        else:
            stops.append(draw(st.lists(ALPHABET, min_size=1, max_size=3).map("".join)))
    return text, stops


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=text_and_stops(),
    include=st.booleans(),
    skip_special=st.booleans(),
    chunks=st.lists(st.integers(1, 4), max_size=30),
)
def test_deltas_equal_full_decode_cut_at_first_stop(
    case: tuple[str, list[str]], include: bool, skip_special: bool, chunks: list[int]
) -> None:
    tokenizer = shared_tokenizer()
    text, stops = case
    ids = tokenizer.encode(text).ids
    full = tokenizer.decode(ids, skip_special_tokens=skip_special)
    want, want_stop = expected_text(full, stops, include)
    spec = DetokenizeSpec(
        stop=stops, include_stop_str_in_output=include, skip_special_tokens=skip_special
    )
    prompt = tokenizer.encode("a prompt 日本").ids
    detok = RequestDetokenizer(tokenizer, prompt, spec)
    pieces, tail = stream(detok, ids, chunks)
    assert "".join(pieces) + tail == want
    assert detok.stop_string == want_stop
    released = ""
    for piece in pieces:
        released += piece
        assert want.startswith(released)  # never past the cut, never out of order
        assert REPLACEMENT not in piece


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 2047), max_size=60), skip_special=st.booleans())
def test_arbitrary_ids_concatenate_to_the_full_decode(ids: list[int], skip_special: bool) -> None:
    # A random model emits byte tokens that never form valid UTF-8: held text must
    # come out at the end exactly as the full decode shows it.
    tokenizer = shared_tokenizer()
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(
        ids, skip_special_tokens=skip_special
    )
    assert all(not p.endswith(REPLACEMENT) for p in pieces)
