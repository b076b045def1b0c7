"""Admission check of structured outputs: a request's grammar
(``SamplingParams.grammar``, llguidance's grammar JSON from shared/grammar.py) is
compiled here against the model's own tokenizer before the request is submitted,
so a grammar that cannot compile is a 400 naming the field it came from, and the
worker (which compiles it again for its matcher) never meets a broken one.

Compiling takes milliseconds for common schemas but can take far longer for a
huge one, so the service calls ``check`` in a thread unless ``cached`` already
knows the verdict. Verdicts are kept per grammar string (LRU): agents send the
same schema again and again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import llguidance
from tokenizers import Tokenizer

from shared.grammar import grammar_error

VERDICT_CACHE_SIZE = 512


class GrammarCheck:
    """Compiles grammars for one tokenizer; safe to call from several threads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer_json = tokenizer.to_str()
        self._vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._verdicts: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, grammar: str) -> str | None:
        """The error of a grammar checked before ("" when it compiled), or None."""
        with self._lock:
            verdict = self._verdicts.get(grammar)
            if verdict is not None:
                self._verdicts.move_to_end(grammar)
            return verdict

    def check(self, grammar: str) -> str:
        """Why ``grammar`` does not compile for this tokenizer, or "". Blocking."""
        verdict = grammar_error(grammar, self._tokenizer())
        with self._lock:
            self._verdicts[grammar] = verdict
            if len(self._verdicts) > VERDICT_CACHE_SIZE:
                self._verdicts.popitem(last=False)
        return verdict

    def _tokenizer(self) -> llguidance.LLTokenizer:
        # Built on the first grammar (tens of ms for a large vocabulary), not at start.
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer_json,
                                                            n_vocab=self._vocab_size)
            return self._ll_tokenizer


def describe(error: str, field: str) -> str:
    """The client's message for a grammar that does not compile."""
    where = f"`{field}`" if field else "the structured output grammar"
    return f"{where} cannot be compiled into a grammar: {error}"
