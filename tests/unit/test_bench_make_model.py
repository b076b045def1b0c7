"""bench/make_model.py: the tiny shape's folder loads in the worker and in
transformers with the same greedy tokens, its tokenizer covers all 128,256 ids,
the real shapes have the real parameter counts, and the weights are seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from bench import llama3_tokenizer as tok
from bench.datasets import DatasetSpec, generate
from bench.make_model import SHAPES, _write_weights, config_json, make_model, tensor_shapes
from bench.prompts import TextPrompts
from services.tokenizer.encoder import PromptEncoder
from services.worker.models.config import parse_config
from services.worker.models.weights import iter_tensors
from services.worker.runner import ModelRunner
from services.worker.step_batch import RequestState, build_step_batch
from shared.protocol.generation import SamplingParams
from tests.local_engine import LocalEngine

NEW_TOKENS = 6
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 MB shards: the 16 MB embedding gets a shard of its own, the rest a second one.
    return make_model(tmp_path_factory.mktemp("tiny") / "model", "tiny", seed=0,
                      max_shard_size="8MB")


@pytest.fixture(scope="module")
def hf(tiny: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


def _prompt(tiny: Path) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids: list[int] = tokenizer("The mesh serves a random Llama of the real shape.").input_ids
    assert ids[0] == tok.special_id(tok.BOS)
    return ids


def test_folder_is_a_sharded_llama3_checkpoint(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert config["vocab_size"] == 128_256 and config["rope_scaling"]["rope_type"] == "llama3"
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    ]
    tensors = dict(iter_tensors(tiny))
    assert set(tensors) == set(tensor_shapes(SHAPES["tiny"])) == set(index["weight_map"])
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    embed = tensors["model.embed_tokens.weight"].float()
    assert embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.isfinite(embed).all()


def test_tokenizer_covers_every_id(tiny: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == tok.VOCAB_SIZE
    for token_id in range(tok.VOCAB_SIZE):
        token = tokenizer.id_to_token(token_id)
        assert token is not None and tokenizer.token_to_id(token) == token_id, token_id
    names = {tokenizer.id_to_token(i) for i in (128000, 128001, 128009)}
    assert names == {tok.BOS, tok.END_OF_TEXT, tok.EOT}
    hf_tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert len(hf_tokenizer) == tok.VOCAB_SIZE
    assert hf_tokenizer.eos_token_id == tok.special_id(tok.EOT)
    chat = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # The project's own encoder renders the same template and adds BOS to text once.
    encoder = PromptEncoder.from_folder(tiny)
    assert encoder.render_chat([{"role": "user", "content": "hi"}], True) == chat
    assert encoder.encode_text("hello").count(tok.special_id(tok.BOS)) == 1


def test_text_prompts_count_the_bos_the_server_adds(tiny: Path) -> None:
    text = TextPrompts.from_model_dir(tiny)
    assert text.added_per_prompt == 1
    encoder = PromptEncoder.from_folder(tiny)
    for request in generate(DatasetSpec("random", input_len=50, range_ratio=0.2), text, 10, 0):
        assert isinstance(request.prompt, str)
        assert len(encoder.encode_text(request.prompt)) == request.prompt_len


def test_tiny_loads_in_the_worker_with_transformers_logits(
    tiny: Path, hf: PreTrainedModel
) -> None:
    runner = ModelRunner(tiny, device="cpu")
    prompt = _prompt(tiny)
    state = RequestState("r", prompt, 0, list(range(-(-len(prompt) // runner.block_size))),
                         GREEDY, 0)
    with torch.inference_mode():
        batch = build_step_batch([state], [len(prompt)], runner.block_size, runner.device)
        hidden = runner.model.forward(batch.input_ids, batch.positions, batch.meta,
                                      runner.kv_cache, torch.arange(len(prompt)))
        logits = runner.model.logits(hidden)
        expected = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=2e-4)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))

    engine = LocalEngine(runner)
    engine.add("r", prompt, GREEDY)
    outputs = engine.run()["r"]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        generated = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                pad_token_id=tok.special_id(tok.END_OF_TEXT))
    assert outputs == generated[0, len(prompt):].tolist()


def test_weights_are_seeded_and_independent_of_sharding(tiny: Path, tmp_path: Path) -> None:
    _write_weights(tmp_path, SHAPES["tiny"], seed=0, max_shard_bytes=10**9)  # one file
    assert (tmp_path / "model.safetensors").is_file()
    again = dict(iter_tensors(tmp_path))
    for name, tensor in iter_tensors(tiny):
        assert torch.equal(tensor, again[name]), name
    other = tmp_path / "seed1"
    other.mkdir()
    _write_weights(other, SHAPES["tiny"], seed=1, max_shard_bytes=10**9)
    with safe_open(str(other / "model.safetensors"), "pt") as f:
        assert not torch.equal(f.get_tensor("model.embed_tokens.weight"),
                               again["model.embed_tokens.weight"])


@pytest.mark.parametrize(("shape", "parameters"), [
    ("llama-3.2-1b", 1_235_814_400),  # Llama-3.2-1B, tied embeddings
    ("llama-3.1-8b", 8_030_261_248),  # Llama-3.1-8B
])
def test_real_shapes_have_the_real_parameter_counts(shape: str, parameters: int) -> None:
    total = 0
    for dims in tensor_shapes(SHAPES[shape]).values():
        count = 1
        for d in dims:
            count *= d
        total += count
    assert total == parameters
    config = parse_config(config_json(SHAPES[shape]))
    assert config.rope.rope_type == "llama3" and config.vocab_size == 128_256
    assert config.eos_token_ids == (128001, 128008, 128009)
