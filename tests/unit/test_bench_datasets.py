"""bench/datasets.py and bench/prompts.py: lengths are exact (as the server counts
them), the shapes are what each set promises, and a seed fixes everything."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from bench.datasets import (
    SHAREGPT_MAX_PROMPT,
    SHAREGPT_MAX_TOTAL,
    SHAREGPT_MIN_LEN,
    DatasetSpec,
    generate,
)
from bench.prompts import TextPrompts, TokenIdPrompts, elide
from shared.embedded_model import ensure_embedded_model

IDS = TokenIdPrompts.of_vocab(1000, frozenset({0, 1, 2}))


@pytest.fixture(scope="module")
def embedded() -> Path:
    return ensure_embedded_model()


def test_random_lengths_are_exact_and_seeded() -> None:
    spec = DatasetSpec("random", input_len=64, output_len=16)
    requests = generate(spec, IDS, 20, seed=1)
    assert all(len(r.prompt) == r.prompt_len == 64 and r.output_len == 16 for r in requests)
    assert all(t not in (0, 1, 2) and 0 <= t < 1000 for r in requests for t in r.prompt)
    assert generate(spec, IDS, 20, seed=1) == requests
    assert generate(spec, IDS, 20, seed=2) != requests


def test_random_range_ratio_bounds() -> None:
    spec = DatasetSpec("random", input_len=100, output_len=50, range_ratio=0.5)
    requests = generate(spec, IDS, 300, seed=0)
    inputs = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests]
    assert min(inputs) >= 50 and max(inputs) <= 150 and len(set(inputs)) > 30
    assert min(outputs) >= 25 and max(outputs) <= 75
    with pytest.raises(ValueError):
        DatasetSpec("random", range_ratio=1.0)


def test_prefix_set_shares_its_prefixes() -> None:
    spec = DatasetSpec("prefix", input_len=16, output_len=4, prefix_len=32, num_prefixes=3)
    requests = generate(spec, IDS, 12, seed=5)
    assert all(r.prompt_len == 48 == len(r.prompt) for r in requests)
    prefixes = Counter(tuple(r.prompt[:32]) for r in requests)
    assert len(prefixes) == 3 and set(prefixes.values()) == {4}  # round robin, shuffled
    assert len({tuple(r.prompt[32:]) for r in requests}) == 12  # suffixes all differ


def test_sharegpt_like_lengths_pass_the_filter_and_vary() -> None:
    requests = generate(DatasetSpec("sharegpt-like"), IDS, 500, seed=0)
    for r in requests:
        assert SHAREGPT_MIN_LEN <= r.prompt_len <= SHAREGPT_MAX_PROMPT
        assert r.output_len >= SHAREGPT_MIN_LEN
        assert r.prompt_len + r.output_len <= SHAREGPT_MAX_TOTAL
        assert len(r.prompt) == r.prompt_len
    inputs = sorted(r.prompt_len for r in requests)
    assert 80 <= inputs[len(inputs) // 2] <= 170  # median near the fit's 120
    assert inputs[-1] > 4 * inputs[len(inputs) // 2]  # long-tailed
    fixed = generate(DatasetSpec("sharegpt-like", sharegpt_output_len=7), IDS, 50, seed=0)
    assert {r.output_len for r in fixed} == {7}


def test_text_prompts_have_the_exact_token_count(embedded: Path) -> None:
    text = TextPrompts.from_model_dir(embedded)
    tokenizer = Tokenizer.from_file(str(embedded / "tokenizer.json"))
    config = json.loads((embedded / "tokenizer_config.json").read_text())
    assert not config["add_bos_token"] and text.added_per_prompt == 0
    for spec in (DatasetSpec("random", input_len=37, output_len=3, range_ratio=0.3),
                 DatasetSpec("prefix", input_len=20, output_len=3, prefix_len=24,
                             num_prefixes=2)):
        for request in generate(spec, text, 20, seed=9):
            assert isinstance(request.prompt, str)
            ids = tokenizer.encode(request.prompt, add_special_tokens=True).ids
            assert len(ids) == request.prompt_len
    prefix = generate(DatasetSpec("prefix", input_len=20, output_len=3, prefix_len=24,
                                  num_prefixes=1), text, 3, seed=1)
    assert all(r.prompt_len == 44 for r in prefix)
    assert generate(DatasetSpec("random", input_len=30), text, 5, seed=3) == generate(
        DatasetSpec("random", input_len=30), text, 5, seed=3
    )


def test_token_ids_come_from_the_model_folder(embedded: Path) -> None:
    source = TokenIdPrompts.from_model_dir(embedded)
    vocab = json.loads((embedded / "config.json").read_text())["vocab_size"]
    assert len(source.allowed) == vocab - 3  # the embedded tokenizer's three specials
    assert min(source.allowed) == 3 and max(source.allowed) == vocab - 1


def test_large_prompts_are_elided() -> None:
    assert elide([1, 2, 3]) == "[1, 2, 3]"
    long = list(range(1000))
    shown = elide(long)
    assert shown.startswith("[0, 1, 2") and "996, 997, 998, 999]" in shown
    assert "(1000 token ids)" in shown and len(shown) < 120
    text = "word " * 500
    assert "(2500 chars)" in elide(text) and len(elide(text)) < 200
    assert elide("short") == "'short'"
