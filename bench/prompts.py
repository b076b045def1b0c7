"""Prompts of an exact token length, as token ids or as text.

Token ids (``TokenIdPrompts``) are exact by construction: /v1/completions accepts a
list of ids as ``prompt`` (meshserve and vLLM do) and the server adds nothing.

Text (``TextPrompts``) is exact by choice of words: the vocabulary's tokens that
decode to a space and ASCII letters (" the", " value") and encode back to that one
token. A byte-level BPE pre-tokenizer splits text before every such word, so a
string of n of them is n tokens, whatever their order. The special tokens the
server adds itself (Llama 3's ``<|begin_of_text|>``) are counted in, so
``prompt_len`` is what the server will see. Tokenizers without such words (a
SentencePiece ``▁`` vocabulary) are refused with a message: use token ids there.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Prompt = list[int] | str

_WORD = re.compile(r" [A-Za-z]{2,12}")
MIN_WORDS = 64  # fewer one-token words than this: not a vocabulary to sample from


@dataclass(frozen=True, slots=True)
class TokenIdPrompts:
    """Random ids from ``allowed`` (the vocabulary minus special tokens)."""

    allowed: tuple[int, ...]

    @classmethod
    def of_vocab(cls, vocab_size: int, special_ids: frozenset[int] = frozenset()) -> TokenIdPrompts:
        allowed = tuple(i for i in range(vocab_size) if i not in special_ids)
        if not allowed:
            raise ValueError(f"no ordinary token ids in a vocabulary of {vocab_size}")
        return cls(allowed)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> TokenIdPrompts:
        """The model's ``config.json`` vocabulary without its added tokens (specials
        in a prompt would change what a chat model does, not its cost)."""
        vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
        specials: set[int] = set()
        tokenizer_file = model_dir / "tokenizer.json"
        if tokenizer_file.is_file():
            added = json.loads(tokenizer_file.read_text()).get("added_tokens", [])
            specials = {int(t["id"]) for t in added if t.get("special", True)}
        return cls.of_vocab(vocab_size, frozenset(specials))

    @property
    def added_per_prompt(self) -> int:
        return 0

    def make(self, rng: random.Random, num_tokens: int) -> list[int]:
        return rng.choices(self.allowed, k=num_tokens)

    def join(self, prefix: Prompt, suffix: Prompt) -> Prompt:
        assert isinstance(prefix, list) and isinstance(suffix, list)
        return prefix + suffix


@dataclass(frozen=True, slots=True)
class TextPrompts:
    """Text made of one-token words; the server adds ``added_per_prompt`` tokens."""

    words: tuple[str, ...]
    added_per_prompt: int
    tokenizer: Any  # tokenizers.Tokenizer, kept to check what we build

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> TextPrompts:
        from tokenizers import Tokenizer  # only text prompts need it

        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: text prompts need a tokenizer.json")
        tokenizer = Tokenizer.from_file(str(path))
        vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=False)
        ids = sorted(vocab.values())  # id order: the same words on every machine
        decoded = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
        candidates = [text for text in decoded if _WORD.fullmatch(text)]
        encoded = tokenizer.encode_batch(candidates, add_special_tokens=False)
        words = tuple(w for w, e in zip(candidates, encoded, strict=True) if len(e.ids) == 1)
        if len(words) < MIN_WORDS:
            raise ValueError(
                f"{path} has {len(words)} tokens that are a space and a word, too few for "
                "exact-length text prompts (a SentencePiece vocabulary?); use token-id "
                "prompts on /v1/completions instead"
            )
        return cls(words, _added_by_server(tokenizer, model_dir), tokenizer)

    def make(self, rng: random.Random, num_tokens: int) -> str:
        """Text of ``num_tokens`` tokens as the server counts them (at least one word)."""
        count = max(1, num_tokens - self.added_per_prompt)
        return "".join(rng.choices(self.words, k=count))

    def join(self, prefix: Prompt, suffix: Prompt) -> Prompt:
        assert isinstance(prefix, str) and isinstance(suffix, str)
        return prefix + suffix

    def count(self, text: str) -> int:
        """Tokens of ``text`` as a completions prompt, the server's specials included."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids) + (
            self.added_per_prompt
        )


def _added_by_server(tokenizer: Any, model_dir: Path) -> int:
    """Special tokens the server adds to a completions prompt: the post-processor's
    (Llama 3's template adds BOS), else ``add_bos_token`` / ``add_eos_token`` in
    tokenizer_config.json, as services/tokenizer/encoder.py does."""
    plain = len(tokenizer.encode("x", add_special_tokens=False).ids)
    by_post_processor = len(tokenizer.encode("x", add_special_tokens=True).ids) - plain
    if by_post_processor:
        return by_post_processor
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return int(bool(config.get("add_bos_token"))) + int(bool(config.get("add_eos_token")))


def elide(prompt: Prompt, head: int = 8, tail: int = 4) -> str:
    """A prompt for printing: large ones show their ends and their size."""
    if isinstance(prompt, str):
        if len(prompt) <= 160:
            return repr(prompt)
        return f"{prompt[:100]!r} ... {prompt[-40:]!r} ({len(prompt)} chars)"
    if len(prompt) <= head + tail + 4:
        return str(prompt)
    first = ", ".join(map(str, prompt[:head]))
    last = ", ".join(map(str, prompt[-tail:]))
    return f"[{first}, ... {last}] ({len(prompt)} token ids)"
