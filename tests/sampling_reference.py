"""Reference implementations the sampling tests compare against: vLLM's penalty
formulas written out per row in plain torch, and transformers' logits on the same
weights (the oracle of the whole project)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def vllm_penalties(logits: torch.Tensor, prompt: Sequence[int], outputs: Sequence[int],
                   presence: float, frequency: float, repetition: float) -> torch.Tensor:
    """vLLM's ``apply_penalties`` for one row [vocab], written token by token."""
    out = logits.clone()
    seen = set(prompt) | set(outputs)
    for token in seen:
        if out[token] > 0:
            out[token] /= repetition
        else:
            out[token] *= repetition
    for token in set(outputs):
        count = list(outputs).count(token)
        out[token] -= frequency * count + presence
    return out


def load_oracle(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def oracle_logits(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """float32 [len(ids), vocab]: the logits at every position."""
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float()


def greedy_with_penalties(model: Any, prompt: Sequence[int], steps: int, presence: float,
                          frequency: float, repetition: float,
                          eos: Sequence[int] = ()) -> list[int]:
    """Greedy decoding with vLLM's penalties applied to transformers' logits."""
    outputs: list[int] = []
    for _ in range(steps):
        logits = oracle_logits(model, [*prompt, *outputs])[-1]
        token = int(vllm_penalties(logits, prompt, outputs, presence, frequency,
                                   repetition).argmax())
        outputs.append(token)
        if token in eos:
            break
    return outputs
