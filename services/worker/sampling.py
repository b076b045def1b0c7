"""Picking one token per row of float32 logits.

Greedy (temperature 0) is the argmax. Otherwise logits are divided by the
temperature, cut by min_p, then top-k, then top-p (vLLM's order), and a token is
drawn with the exponential race: ``argmax(probs / noise)`` with ``noise ~ Exp(1)``
picks token i with probability probs[i]. The race is what makes seeded sampling reproducible: the
noise of a seeded request's output token k comes from a generator seeded by
(seed, k) alone, so it does not depend on which other requests share the batch,
nor on how many steps it took to get there (recompute preemption resumes at k).

Stops (EOS, ``min_tokens``, ``ignore_eos``) are the scheduler's business; bad
words, biases and penalties are applied before (``logits_processing.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from services.worker.logits_processing import apply_min_p
from shared.protocol.generation import SamplingParams

_MASK64 = (1 << 64) - 1


def noise_seed(seed: int, output_index: int) -> int:
    """A well-mixed 63-bit generator seed from (request seed, output token index)
    (splitmix64 over both, so nearby seeds and indices give unrelated streams)."""
    x = (seed * 0x9E3779B97F4A7C15 + output_index * 0xD1B54A32D192ED03 + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


MAX_LOGPROBS = 20  # OpenAI's limit for top logprobs, and vLLM's default


def validate_sampling(params: SamplingParams, vocab_size: int | None = None) -> str | None:
    """Why ``params`` cannot be sampled with, or None."""
    if not params.temperature >= 0.0:  # also rejects NaN
        return f"temperature must be >= 0, got {params.temperature}"
    if not 0.0 < params.top_p <= 1.0:
        return f"top_p must be in (0, 1], got {params.top_p}"
    if params.top_k < 0:
        return f"top_k must be >= 0, got {params.top_k}"
    if not 0.0 <= params.min_p <= 1.0:
        return f"min_p must be in [0, 1], got {params.min_p}"
    if not params.repetition_penalty > 0.0:
        return f"repetition_penalty must be > 0, got {params.repetition_penalty}"
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(params, name) <= 2.0:
            return f"{name} must be in [-2, 2], got {getattr(params, name)}"
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if not -1 <= value <= MAX_LOGPROBS:
            return f"{name} must be in [0, {MAX_LOGPROBS}] (or -1: none), got {value}"
    if vocab_size is not None:
        tokens = [*params.logit_bias, *(t for w in params.bad_words_token_ids for t in w)]
        if any(not 0 <= t < vocab_size for t in tokens):
            return f"logit_bias or bad_words name token ids outside [0, {vocab_size})"
        if any(not w for w in params.bad_words_token_ids):
            return "bad_words_token_ids holds an empty word"
    return None


class Sampler:
    """Samples rows of logits; owns the generator for unseeded requests."""

    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(
            seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        )

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
    ) -> list[int]:
        """One token id per row of ``logits`` [rows, vocab] (float32).
        ``output_indices[i]`` is how many output tokens row i's request already has."""
        return self.sample_ids(logits, params, output_indices).tolist()

    def sample_ids(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
    ) -> torch.Tensor:
        """``sample`` without leaving the device: int64 [rows] where the logits are,
        so the caller decides when to wait for the values."""
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
        if not random_rows:
            return tokens
        chosen = self._sample_random(
            logits[random_rows] if len(random_rows) < len(params) else logits,
            [params[i] for i in random_rows],
            [output_indices[i] for i in random_rows],
        )
        if len(random_rows) == len(params):
            return chosen
        tokens[torch.tensor(random_rows, device=logits.device)] = chosen
        return tokens

    def _sample_random(
        self, logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]
    ) -> torch.Tensor:
        vocab = logits.shape[1]
        device = logits.device
        temperatures = torch.tensor([p.temperature for p in params], device=device)
        scaled = logits / temperatures[:, None]
        top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_ps = [p.top_p for p in params]
        min_ps = [p.min_p for p in params]
        if any(m > 0.0 for m in min_ps):
            scaled = apply_min_p(scaled, min_ps)
        if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
            scaled = _cut_top_k_top_p(scaled, top_ks, top_ps)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            drawn = torch.empty((len(unseeded), vocab), device=device)
            drawn.exponential_(generator=self._generator)
            noise[unseeded] = drawn
        for i, p in enumerate(params):
            if p.seed is not None:
                generator = torch.Generator(device=device)
                generator.manual_seed(noise_seed(p.seed, output_indices[i]))
                noise[i].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)


def _cut_top_k_top_p(
    scaled: torch.Tensor, top_ks: list[int], top_ps: list[float]
) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus, to -inf.
    The nucleus is the smallest prefix of tokens by probability whose mass reaches
    top_p (the most likely token always stays). Ties at the k-th logit all stay."""
    device = scaled.device
    ks = torch.tensor(top_ks, device=device)
    if all(p >= 1.0 for p in top_ps):
        # Top-k alone needs only the k largest, not a sort of the whole vocabulary.
        largest = scaled.topk(max(top_ks), dim=-1).values
        kth = largest.gather(1, (ks - 1)[:, None])
        return scaled.masked_fill(scaled < kth, float("-inf"))
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    kth = sorted_logits.gather(1, (ks - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    # top_p 1 keeps everything: use a bound the float32 cumsum cannot reach.
    ps = torch.tensor([p if p < 1.0 else 2.0 for p in top_ps], device=device)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= ps[:, None], float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
