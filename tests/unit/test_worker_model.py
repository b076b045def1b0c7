"""The worker's model code against transformers as the oracle.

Five models: the embedded Llama, and tiny seeded folders this module writes with
transformers itself: Qwen2 (q/k/v bias, tied embeddings, sharded safetensors),
Qwen3 (per-head q/k RMSNorm before rotary, no bias, head_dim not hidden/heads),
Llama 3 (``llama3`` rope scaling, attention and MLP biases) and Mistral (a sliding
window shorter than the prompts, ``linear`` rope scaling).

Every tiny model's weights are redrawn wider than transformers' initialiser (see
``LM_HEAD_STD`` in shared/embedded_model.py): with std-0.02 weights the logits
are near-ties and greedy decoding would compare float rounding, not the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from services.worker.models.config import UnsupportedModelError, parse_config
from services.worker.runner import ModelRunner
from services.worker.step_batch import RequestState, build_step_batch
from shared.embedded_model import LM_HEAD_STD, WEIGHT_STD, ensure_embedded_model
from shared.protocol.generation import SamplingParams
from tests.local_engine import LocalEngine

PROMPT_LENGTHS = (1, 2, 15, 16, 17, 64, 129, 300, 600)
NEW_TOKENS = 8
BLOCK_SIZE = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)


def _redraw_weights(model: PreTrainedModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                param.copy_(LM_HEAD_STD * noise)
            else:
                param.copy_(WEIGHT_STD * noise)


def _tiny_model(
    folder: Path, model: PreTrainedModel, seed: int, shard: str | None = None
) -> PreTrainedModel:
    _redraw_weights(model, seed)
    model.eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return model


_SMALL = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def _qwen2(folder: Path) -> PreTrainedModel:
    config = Qwen2Config(**_SMALL, tie_word_embeddings=True, rms_norm_eps=1e-6)
    model = _tiny_model(folder, Qwen2ForCausalLM(config), seed=1, shard="100KB")
    assert (folder / "model.safetensors.index.json").is_file()  # sharded on purpose
    return model


def _qwen3(folder: Path) -> PreTrainedModel:
    # head_dim 32 with hidden 64 / 4 heads (16): Qwen3 sets head_dim on its own.
    config = Qwen3Config(**_SMALL, head_dim=32, rms_norm_eps=1e-6)
    return _tiny_model(folder, Qwen3ForCausalLM(config), seed=4)


def _llama3(folder: Path) -> PreTrainedModel:
    config = LlamaConfig(
        **_SMALL,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return _tiny_model(folder, LlamaForCausalLM(config), seed=2)


def _mistral(folder: Path) -> PreTrainedModel:
    config = MistralConfig(
        **_SMALL,
        sliding_window=48,
        rope_scaling={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )
    return _tiny_model(folder, MistralForCausalLM(config), seed=3)


@pytest.fixture(scope="module", params=["embedded", "qwen2", "qwen3", "llama3", "mistral"])
def model_case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, PreTrainedModel]:
    if request.param == "embedded":
        folder = ensure_embedded_model()
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return folder, hf
    folder = tmp_path_factory.mktemp(request.param)
    builders = {"qwen2": _qwen2, "qwen3": _qwen3, "llama3": _llama3, "mistral": _mistral}
    build = builders[request.param]
    return folder, build(folder)


def _prompts(vocab: int) -> dict[str, list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return {
        f"len{n}": torch.randint(0, vocab, (n,), generator=generator).tolist()
        for n in PROMPT_LENGTHS
    }


def _hf_greedy(hf: PreTrainedModel, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


def _chunked_logits(runner: ModelRunner, tokens: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits of every position, computed chunk by chunk through the paged cache."""
    blocks = list(range(runner.num_kv_blocks))[::-1]  # descending: not the identity map
    state = RequestState("r", tokens, 0, blocks[: -(-len(tokens) // BLOCK_SIZE)], GREEDY, 0)
    parts = []
    with torch.inference_mode():
        for n in chunks:
            batch = build_step_batch([state], [n], runner.block_size, runner.device)
            rows = torch.arange(n)
            hidden = runner.model.forward(
                batch.input_ids, batch.positions, batch.meta, runner.kv_cache, rows
            )
            parts.append(runner.model.logits(hidden))
            state.num_computed += n
    return torch.cat(parts)


def test_prefill_logits_match_transformers(model_case: tuple[Path, PreTrainedModel]) -> None:
    folder, hf = model_case
    runner = ModelRunner(folder, "cpu", "float32", num_kv_blocks=64, block_size=BLOCK_SIZE)
    tokens = _prompts(runner.model.config.vocab_size)["len300"]
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0].float()
    whole = _chunked_logits(runner, tokens, [300])
    torch.testing.assert_close(whole, expected, rtol=1e-4, atol=2e-4)
    # The same logits when the prompt arrives in uneven chunks over scattered blocks.
    chunked = _chunked_logits(runner, tokens, [1, 46, 17, 100, 1, 135])
    torch.testing.assert_close(chunked, expected, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_greedy_batched_chunked_generation_matches_generate(
    model_case: tuple[Path, PreTrainedModel], device: str,
) -> None:
    # On CUDA the step runs the Triton kernels and the CUDA graphs (decode and
    # mixed), in float32 so the oracle's tokens must come out exactly.
    folder, hf = model_case
    runner = ModelRunner(folder, device, "float32", num_kv_blocks=512, block_size=BLOCK_SIZE)
    engine = LocalEngine(runner, chunk_size=64, token_budget=200, block_order_seed=7)
    prompts = _prompts(runner.model.config.vocab_size)
    for request_id, prompt in prompts.items():
        engine.add(request_id, prompt, GREEDY)
    outputs = engine.run()
    for request_id, prompt in prompts.items():
        expected = _hf_greedy(hf, prompt)
        # generate() may stop early at an EOS; the runner does not stop on its own.
        assert outputs[request_id][: len(expected)] == expected, request_id
        assert len(outputs[request_id]) == NEW_TOKENS


def test_unsupported_configs_fail_clearly() -> None:
    base = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2,
    }
    assert parse_config(base).rope.rope_type == "default"
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        parse_config(base | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModelError, match="architectures"):
        parse_config(base | {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        parse_config(base | {"hidden_act": "gelu"})
    old_style = parse_config(
        base | {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}
    )
    assert (old_style.rope.rope_type, old_style.rope.theta, old_style.rope.factor) == (
        "linear", 5e5, 4.0,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_tokens_equal_cpu() -> None:
    folder = ensure_embedded_model()
    prompts = _prompts(2048)
    results = []
    for device in ("cpu", "cuda"):
        runner = ModelRunner(folder, device, "float32", num_kv_blocks=512, block_size=BLOCK_SIZE)
        engine = LocalEngine(runner, chunk_size=64, token_budget=200, block_order_seed=7)
        for request_id, prompt in prompts.items():
            engine.add(request_id, prompt, GREEDY)
        results.append(engine.run())
    assert results[0] == results[1]
    # bf16 (the CUDA default) runs the same path; its tokens drift from float32 only
    # where the greedy margin is below bf16 resolution, so check the first token.
    runner = ModelRunner(folder, "cuda", "auto", num_kv_blocks=512, block_size=BLOCK_SIZE)
    assert runner.dtype == torch.bfloat16
    engine = LocalEngine(runner, chunk_size=64, token_budget=200)
    for request_id, prompt in prompts.items():
        engine.add(request_id, prompt, GREEDY)
    bf16 = engine.run()
    agree = sum(bf16[r][0] == results[0][r][0] for r in prompts)
    assert agree >= len(prompts) - 1
