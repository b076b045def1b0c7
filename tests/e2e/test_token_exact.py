"""Greedy decoding through the whole mesh is token-exact with transformers'
``generate()`` on the same weights: 16 prompts of 1 to 600 tokens at once, with a
prefill chunk small enough that long prompts take several steps, for a Llama
config (the embedded model) and a Qwen2 config. Seeded sampling repeats itself."""

from __future__ import annotations

import json
import random
import shutil
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
import torch

from shared.embedded_model import ensure_embedded_model
from tests.e2e.mesh import start_mesh

PROMPT_LENGTHS = [1, 2, 5, 16, 17, 33, 64, 100, 127, 200, 257, 333, 411, 480, 555, 600]
MAX_TOKENS = 24
CHUNKED = ["--set", "max_prefill_chunk=48", "--set", "max_num_batched_tokens=256"]


def make_prompts(vocab: int, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids 0..2 are the embedded tokenizer's special tokens; keep prompts ordinary.
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


def oracle(model_dir: Path, prompts: list[list[int]]) -> list[tuple[str, int, str]]:
    """(text, completion tokens, finish reason) per prompt, from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = set(model.generation_config.eos_token_id or [])
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_TOKENS, pad_token_id=0)
        new = out[0, len(prompt):].tolist()
        finish = "stop" if new and new[-1] in eos else "length"
        answers.append((tokenizer.decode(new, skip_special_tokens=True), len(new), finish))
    return answers


async def complete_all(base_url: str, prompts: list[list[int]], **extra: object
                       ) -> list[tuple[str, int, str]]:
    results: list[tuple[str, int, str]] = [("", 0, "")] * len(prompts)
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def one(i: int) -> None:
            body = {"model": model, "prompt": prompts[i], "max_tokens": MAX_TOKENS,
                    "temperature": 0, **extra}
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            data = response.json()
            choice = data["choices"][0]
            results[i] = (choice["text"], data["usage"]["completion_tokens"],
                          choice["finish_reason"])

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(one, i)
    return results


def make_qwen2_dir(target: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    embedded = ensure_embedded_model()
    config = Qwen2Config(
        vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        eos_token_id=json.loads((embedded / "config.json").read_text())["eos_token_id"],
        pad_token_id=0, use_sliding_window=False,
    )
    torch.manual_seed(1234)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Decisive greedy margins (see shared/embedded_model.py, LM_HEAD_STD).
        model.lm_head.weight.normal_(0.0, 0.5)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.05)
    model.save_pretrained(target, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(embedded / name, target / name)
    return target


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_matches_transformers_under_concurrency_and_chunked_prefill(
        family: str, tmp_path: Path) -> None:
    model_dir = ensure_embedded_model() if family == "llama" else make_qwen2_dir(
        tmp_path / "qwen2")
    prompts = make_prompts(vocab=2048)
    expected = oracle(model_dir, prompts)
    args = [*CHUNKED] + (["--model", str(model_dir)] if family == "qwen2" else [])
    mesh = start_mesh(tmp_path, extra_args=args)
    try:
        got = anyio.run(complete_all, mesh.base_url, prompts)
    finally:
        mesh.stop()
    for length, want, have in zip(PROMPT_LENGTHS, expected, got, strict=True):
        assert have == want, f"prompt of {length} tokens"


def test_seeded_sampling_repeats(tmp_path: Path) -> None:
    prompts = make_prompts(vocab=2048, seed=3)[:8]
    mesh = start_mesh(tmp_path, extra_args=CHUNKED)
    try:
        sampled = dict(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
        first = anyio.run(partial(complete_all, mesh.base_url, prompts, **sampled))
        # Again, with a different batch around each request: reversed order.
        second = anyio.run(partial(complete_all, mesh.base_url, prompts[::-1], **sampled))[::-1]
    finally:
        mesh.stop()
    assert first == second
    assert len({text for text, _, _ in first}) > 1
