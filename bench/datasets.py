"""Benchmark request sets, generated locally from a seed (no download: no network).

    random         input and output lengths uniform in [X(1-r), X(1+r)] around
                   --random-input-len / --random-output-len (r: --random-range-ratio),
                   as vLLM's random set; r = 0 gives every request the same shape.
    prefix         --num-prefixes shared prefixes of --prefix-len tokens, each
                   request one of them (round robin, then shuffled) plus a random
                   suffix drawn as in ``random``: a system-prompt / few-shot workload
                   that the prefix cache should turn into short prefills.
    sharegpt-like  prompt and output lengths from log-normal fits of ShareGPT
                   conversation turns (long-tailed, median ~120 in / ~150 out),
                   filtered as vLLM filters ShareGPT: both >= 4, prompt <= 1024,
                   prompt + output <= 2048. --sharegpt-output-len fixes the output.

The same seed gives the same requests (lengths and tokens) on any machine for the
same prompt vocabulary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from bench.prompts import Prompt, TextPrompts, TokenIdPrompts

DATASETS = ("random", "prefix", "sharegpt-like")

# ShareGPT-like length model: log-normal (median, sigma) per side, and vLLM's filter.
SHAREGPT_PROMPT = (120.0, 1.0)
SHAREGPT_OUTPUT = (150.0, 0.9)
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT = 1024
SHAREGPT_MAX_TOTAL = 2048

PromptSource = TokenIdPrompts | TextPrompts


@dataclass(frozen=True, slots=True)
class SampleRequest:
    prompt: Prompt
    prompt_len: int  # tokens the server will count for a completions prompt
    output_len: int  # tokens asked for (max_tokens with ignore_eos)


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    name: str = "random"
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 256
    num_prefixes: int = 8
    sharegpt_output_len: int | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"dataset {self.name!r}: choose one of {', '.join(DATASETS)}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {self.range_ratio}")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input and output lengths must be >= 1")
        if self.name == "prefix" and (self.prefix_len < 1 or self.num_prefixes < 1):
            raise ValueError("--prefix-len and --num-prefixes must be >= 1")


def uniform_len(rng: random.Random, mean: int, ratio: float) -> int:
    """An integer uniform in [floor(mean(1-r)), ceil(mean(1+r))], at least 1."""
    low = max(1, math.floor(mean * (1.0 - ratio)))
    high = max(low, math.ceil(mean * (1.0 + ratio)))
    return rng.randint(low, high)


def sharegpt_lengths(rng: random.Random, fixed_output: int | None) -> tuple[int, int]:
    """One (prompt, output) length pair that passes vLLM's ShareGPT filter."""
    while True:
        prompt = round(rng.lognormvariate(math.log(SHAREGPT_PROMPT[0]), SHAREGPT_PROMPT[1]))
        output = fixed_output or round(
            rng.lognormvariate(math.log(SHAREGPT_OUTPUT[0]), SHAREGPT_OUTPUT[1])
        )
        if fixed_output is not None:
            # A fixed output length is the user's choice: only the prompt is filtered.
            if SHAREGPT_MIN_LEN <= prompt <= SHAREGPT_MAX_PROMPT:
                return prompt, output
        elif (
            min(prompt, output) >= SHAREGPT_MIN_LEN
            and prompt <= SHAREGPT_MAX_PROMPT
            and prompt + output <= SHAREGPT_MAX_TOTAL
        ):
            return prompt, output


def _prompt_len(source: PromptSource, prompt: Prompt) -> int:
    """Counted, not assumed: for text this re-encodes, which also proves the
    one-token-word construction on this tokenizer."""
    if isinstance(prompt, list):
        return len(prompt)
    assert isinstance(source, TextPrompts)
    return source.count(prompt)


def generate(spec: DatasetSpec, source: PromptSource, count: int, seed: int) -> list[SampleRequest]:
    """``count`` requests of ``spec``; the same seed gives the same list."""
    rng = random.Random(seed)
    requests: list[SampleRequest] = []
    if spec.name == "random":
        for _ in range(count):
            in_len = uniform_len(rng, spec.input_len, spec.range_ratio)
            out_len = uniform_len(rng, spec.output_len, spec.range_ratio)
            prompt = source.make(rng, in_len)
            requests.append(SampleRequest(prompt, _prompt_len(source, prompt), out_len))
    elif spec.name == "prefix":
        # The server's specials (BOS) belong to the prefix: they precede it.
        prefixes = [source.make(rng, spec.prefix_len) for _ in range(spec.num_prefixes)]
        order = [i % spec.num_prefixes for i in range(count)]
        rng.shuffle(order)
        for which in order:
            suffix_len = uniform_len(rng, spec.input_len, spec.range_ratio)
            out_len = uniform_len(rng, spec.output_len, spec.range_ratio)
            # Text suffixes are made with no room for specials: they are mid-prompt.
            suffix = source.make(rng, suffix_len + source.added_per_prompt)
            prompt = source.join(prefixes[which], suffix)
            requests.append(SampleRequest(prompt, _prompt_len(source, prompt), out_len))
    else:
        for _ in range(count):
            in_len, out_len = sharegpt_lengths(rng, spec.sharegpt_output_len)
            prompt = source.make(rng, in_len)
            requests.append(SampleRequest(prompt, _prompt_len(source, prompt), out_len))
    return requests
