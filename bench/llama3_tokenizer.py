"""A byte-level BPE tokenizer with Llama 3's vocabulary layout: 128,000 ordinary
tokens, then 256 special tokens at ids 128000..128255 with Llama 3's names, so
every id a Llama-3-shaped model can emit decodes to a token.

It is built the way shared/embedded_model.py builds the embedded tokenizer (BPE
trained on this Python's standard library sources, deterministic for a fixed
input order), then, because that corpus yields only ~24k merges, extended with
synthetic merges of the most frequent tokens (pairs in id order whose join is not
yet a token) until the ordinary vocabulary holds exactly 128,000 entries. Those
extra tokens are real BPE merges, so they decode like any other token; ordinary
text rarely produces them, which is what a benchmark needs (prompts are built
from token ids or from one-token words, never from fluent text).

The post-processor prepends ``<|begin_of_text|>`` as Llama 3's does; the chat
template is Llama 3's header / ``<|eot_id|>`` format without its tool-calling part.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.embedded_model import _corpus_files

ORDINARY_VOCAB = 128_000
NUM_SPECIAL = 256
VOCAB_SIZE = ORDINARY_VOCAB + NUM_SPECIAL
MAX_POSITIONS = 131_072
# The merges are drawn from pairs of the first tokens (the byte alphabet and the
# earliest, most frequent merges): 512**2 pairs leave room for any shortfall.
SYNTHETIC_PAIR_BASE = 512

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def special_tokens() -> list[str]:
    """Llama 3's 256 special tokens in id order (128000 first)."""
    named = [
        BOS, END_OF_TEXT, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
        "<|end_header_id|>", EOM, EOT, "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL - len(named))]
    return named + reserved


def special_id(token: str) -> int:
    return ORDINARY_VOCAB + special_tokens().index(token)


def _trained_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ORDINARY_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(_corpus_files(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
              for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[arg-type]


def _extend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Add synthetic merges until ``vocab`` has ``ORDINARY_VOCAB`` entries."""
    by_id = sorted(vocab, key=vocab.__getitem__)[:SYNTHETIC_PAIR_BASE]
    for left in by_id:
        for right in by_id:
            if len(vocab) == ORDINARY_VOCAB:
                return
            joined = left + right
            if joined not in vocab:
                vocab[joined] = len(vocab)
                merges.append((left, right))
    raise RuntimeError(f"only {len(vocab)} tokens from {SYNTHETIC_PAIR_BASE}**2 pairs")


def write_tokenizer(out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in ``out``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = _trained_bpe()
    if len(vocab) < ORDINARY_VOCAB:
        _extend(vocab, merges)
    assert sorted(vocab.values()) == list(range(ORDINARY_VOCAB)), "ids must be dense"
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = special_tokens()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in specials])
    if tokenizer.token_to_id(specials[-1]) != VOCAB_SIZE - 1:
        raise RuntimeError("special tokens did not land at ids 128000..128255")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, special_id(BOS))]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(ORDINARY_VOCAB + i): {
                "content": t, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True,
            }
            for i, t in enumerate(specials)
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOT}, indent=2)
    )
