"""Sampling: greedy is argmax, top-k/top-p cut the support, the exponential race
follows the distribution, and seeded noise depends only on (seed, output index)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from services.worker.sampling import Sampler, noise_seed, validate_sampling
from shared.protocol.generation import SamplingParams

CPU = torch.device("cpu")


def _logits(rows: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_temperature_zero_is_argmax_even_beside_sampled_rows() -> None:
    logits = _logits(6)
    sampler = Sampler(CPU, seed=1)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    tokens = sampler.sample(logits, params, [0] * 6)
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]
    assert sampler.sample(logits, [SamplingParams(temperature=0.0)] * 6, [0] * 6) == argmax


def test_seeded_noise_is_independent_of_batch_and_neighbours() -> None:
    logits = _logits(5)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = [Sampler(CPU).sample(logits[2:3], [seeded], [k])[0] for k in range(20)]
    others = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.2, seed=7)]
    for k in range(20):
        # Same row among other rows, at another batch position, by another sampler.
        params = [others[0], others[1], others[0], seeded, others[1]]
        batch = torch.stack([logits[0], logits[1], logits[4], logits[2], logits[3]])
        assert Sampler(CPU).sample(batch, params, [k, 3, 9, k, 1])[3] == alone[k]
    assert len(set(alone)) > 1  # the output index does change the noise


def test_unseeded_sampler_follows_its_own_generator() -> None:
    logits = _logits(4)
    params = [SamplingParams(temperature=1.0)] * 4
    first = [Sampler(CPU, seed=5).sample(logits, params, [0] * 4) for _ in range(2)]
    assert first[0] == first[1]


def test_top_k_restricts_support() -> None:
    logits = _logits(1)
    top3 = set(logits[0].topk(3).indices.tolist())
    params = [SamplingParams(temperature=2.0, top_k=3, seed=s) for s in range(300)]
    batch = logits.expand(300, -1).contiguous()
    seen = set(Sampler(CPU).sample(batch, params, [0] * 300))
    assert seen == top3
    one = SamplingParams(temperature=5.0, top_k=1, seed=3)
    assert Sampler(CPU).sample(logits, [one], [0]) == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_prefix_reaching_its_mass() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()
    cases = {0.5: {1}, 0.7: {1, 3}, 0.85: {1, 3, 2}, 1.0: {0, 1, 2, 3, 4}}
    for top_p, support in cases.items():
        params = [SamplingParams(temperature=1.0, top_p=top_p, seed=s) for s in range(400)]
        seen = set(Sampler(CPU).sample(logits.expand(400, -1), params, [0] * 400))
        assert seen == support, top_p
    # Both cuts: top-k first (keeps 0.5 and 0.3), then the nucleus of what is left.
    both = [SamplingParams(temperature=1.0, top_k=2, top_p=0.99, seed=s) for s in range(400)]
    assert set(Sampler(CPU).sample(logits.expand(400, -1), both, [0] * 400)) == {1, 3}
    narrow = [SamplingParams(temperature=1.0, top_k=2, top_p=0.6, seed=s) for s in range(400)]
    assert set(Sampler(CPU).sample(logits.expand(400, -1), narrow, [0] * 400)) == {1}


def test_exponential_race_matches_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log()[None, :].expand(4000, -1)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4000)]
    counts = Counter(Sampler(CPU).sample(logits, params, [0] * 4000))
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / 4000 - p) < 0.03, (token, counts)


def test_noise_seed_mixes_and_fits_63_bits() -> None:
    seeds = {noise_seed(s, k) for s in range(-3, 30) for k in range(30)}
    assert len(seeds) == 33 * 30
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
    ],
)
def test_invalid_params_are_named(params: SamplingParams, problem: str) -> None:
    reason = validate_sampling(params)
    assert reason is not None and problem in reason
