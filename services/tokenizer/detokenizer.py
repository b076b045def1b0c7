"""Incremental detokenization: token ids in, client text out, one request at a time.

Two layers, both pure (no I/O):

``IncrementalDecoder`` turns ids into text without ever releasing broken UTF-8. It
keeps two offsets into the ids, like vLLM's detokenizer:

    ids:   [ ... context ... | ... already released ... | new ids ... ]
                          prefix_offset             read_offset
    released text += decode(ids[prefix:]) minus decode(ids[prefix:read])

Decoding a short window that starts a few tokens back (rather than each new id
alone) keeps decoders that look at their neighbours right (SentencePiece's leading
"▁", byte fallback). While the window's text ends in U+FFFD the newest ids are an
incomplete character (byte-level BPE splits emoji and CJK over several tokens), so
nothing is released until a later id completes it. We do not use
``tokenizers.decoders.DecodeStream``: it cannot hand back what it holds when the
stream ends, and it cannot be seeded with the prompt's tail.

``RequestDetokenizer`` chains a decoder with a ``StopStringMatcher`` and tracks
whether the request stopped on a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

from services.tokenizer.stop_strings import StopStringMatcher
from shared.protocol.generation import DetokenizeSpec

REPLACEMENT_CHAR = "\ufffd"
# Prompt ids decoded in front of the first output id: enough for any decoder's
# look-behind (vLLM uses the same five), few enough to stay cheap.
PROMPT_CONTEXT_IDS = 5
MAX_IDS_PER_CHAR = 4  # a UTF-8 character is at most 4 bytes, so at most 4 byte tokens


class IncrementalDecoder:
    """Releases the text of streamed ids, holding back incomplete characters.

    Guarantee: the concatenation of everything ``push`` and ``flush`` return
    equals the decode of the pushed ids (as the tokenizer decodes them after
    ``context_ids``), and no returned piece ends inside a UTF-8 sequence except
    the one ``flush`` returns at the end of the stream.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        context_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = list(context_ids[-PROMPT_CONTEXT_IDS:])
        # A context that itself ends in a broken character (a prompt given as raw
        # ids can) would make the first output's text unaligned: drop it.
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    @property
    def pending_ids(self) -> int:
        """Ids pushed whose text is still held back."""
        return len(self._ids) - self._read_offset

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is open)."""
        self._ids.append(token_id)
        return self._release(final=False)

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Add several ids at once; one decode instead of one per id."""
        self._ids.extend(token_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The stream ended: release what is held, broken characters included (as
        U+FFFD, exactly as a full decode shows them)."""
        return self._release(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _release(self, *, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        end = len(self._ids)
        text = self._decode(self._ids[self._prefix_offset : end])
        if not final:
            # Several new ids ending in an open character: release the complete
            # text before it. A character spans at most 4 bytes, hence 4 ids.
            backed_off = 0
            while (
                text.endswith(REPLACEMENT_CHAR)
                and backed_off < MAX_IDS_PER_CHAR
                and end - 1 > self._read_offset
            ):
                end -= 1
                backed_off += 1
                text = self._decode(self._ids[self._prefix_offset : end])
            if len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR):
                return ""
        released = text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = end
        # Released ids before the new prefix are never decoded again.
        if self._prefix_offset > 0:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return released


class RequestDetokenizer:
    """One request's output ids -> client text, with stop strings applied.

    ``stopped`` becomes True when a stop string matched; the text returned up to
    then is final (cut at the match, the stop string kept only when the spec says
    so) and later ids produce nothing.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], spec: DetokenizeSpec
    ) -> None:
        self._decoder = IncrementalDecoder(tokenizer, prompt_ids, spec.skip_special_tokens)
        self._stops = StopStringMatcher(spec.stop, spec.include_stop_str_in_output)

    @property
    def stopped(self) -> bool:
        return self._stops.matched is not None

    @property
    def stop_string(self) -> str | None:
        return self._stops.matched

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._stops.push(self._decoder.push(token_id))

    def push_many(self, token_ids: Iterable[int]) -> tuple[str, int]:
        """Feed ids until a stop string matches; (text, ids consumed).

        Without stop strings all ids are decoded in one go; with them, one id at a
        time, so the count of ids up to the one that completed the match is exact.
        """
        if self.stopped:
            return "", 0
        if not self._stops.active:
            ids = list(token_ids)
            return self._decoder.push_many(ids), len(ids)
        pieces: list[str] = []
        consumed = 0
        for token_id in token_ids:
            consumed += 1
            pieces.append(self._stops.push(self._decoder.push(token_id)))
            if self.stopped:
                break
        return "".join(pieces), consumed

    def finish(self) -> str:
        """Generation ended: release everything still held. The decoder's tail
        still goes through the stop strings (it can complete a match), then the
        matcher's held text, which can no longer become one, is released."""
        if self.stopped:
            return ""
        text = self._stops.push(self._decoder.flush())
        return text + self._stops.flush()
