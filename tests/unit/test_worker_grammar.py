"""Structured outputs on the worker: each constrained request's output follows its
grammar (random weights, sampled), ends with EOS when the grammar is complete, and
its matcher lives exactly as long as the request (finish, preemption, reset)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from services.worker.grammar import StepMask
from services.worker.runner import ModelRunner
from shared.embedded_model import ensure_embedded_model
from shared.grammar import choice_grammar, json_object_grammar, json_schema_grammar, regex_grammar
from shared.protocol.generation import SamplingParams
from tests.local_engine import LocalEngine
from tests.unit.test_worker_runner import INTERPRETED, new, plan

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
EMAIL = r"[a-z]{1,8}@[a-z]{2,6}\.(com|org)"


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(ensure_embedded_model(), "cpu", "float32", num_kv_blocks=256,
                       block_size=8)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(ensure_embedded_model() / "tokenizer.json"))


def constrained(runner: ModelRunner, grammar: str, **sampling: object) -> SamplingParams:
    params: dict[str, object] = {"max_tokens": 96, "temperature": 1.0,
                                 "stop_token_ids": list(runner.model.config.eos_token_ids)}
    params.update(sampling)
    return SamplingParams(grammar=grammar, **params)  # type: ignore[arg-type]


def test_outputs_follow_their_grammars_in_one_batch(runner: ModelRunner,
                                                    tokenizer: Tokenizer) -> None:
    runner.reset()
    eos = set(runner.model.config.eos_token_ids)
    engine = LocalEngine(runner, chunk_size=16)
    prompt = tokenizer.encode("Answer in JSON:").ids
    for seed in range(4):
        engine.add(f"json-{seed}", prompt,
                   constrained(runner, json_schema_grammar(SCHEMA), seed=seed,
                               temperature=0.5 + seed / 2))
    engine.add("email", prompt, constrained(runner, regex_grammar(EMAIL), seed=7))
    engine.add("choice", prompt, constrained(runner, choice_grammar(["red", "green"]),
                                             temperature=0.0))
    engine.add("object", prompt, constrained(runner, json_object_grammar(), seed=3))
    engine.add("free", prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=1))
    outputs = engine.run()
    for request_id, ids in outputs.items():
        if request_id == "free":
            continue
        assert ids[-1] in eos, (request_id, ids)  # ended by the grammar, not by length
        text = tokenizer.decode(ids[:-1])
        if request_id.startswith("json"):
            jsonschema.validate(json.loads(text), SCHEMA)
        elif request_id == "email":
            assert re.fullmatch(EMAIL, text), text
        elif request_id == "choice":
            assert text in ("red", "green")
        else:
            assert isinstance(json.loads(text), dict)
    assert len(outputs["free"]) == 12  # the unconstrained row ran as before
    assert len(runner.grammars) == 0  # every finished request dropped its matcher


def test_a_grammar_that_can_only_end_samples_eos_at_once(runner: ModelRunner) -> None:
    runner.reset()
    eos = runner.model.config.eos_token_ids
    result = runner.execute(plan(1, new=[new("done", [5, 6, 7],
                                             **_fields(constrained(runner, regex_grammar(""))))],
                                 work={"done": 3}, owners=[0], blocks=[1]))
    (token,) = result.token_ids and list(memoryview(result.token_ids).cast("i"))
    assert token in eos


def test_finishing_or_resetting_frees_the_matcher(runner: ModelRunner) -> None:
    runner.reset()
    sampling = _fields(constrained(runner, regex_grammar("[a-z]{50}")))
    runner.execute(plan(1, new=[new("r", [5, 6, 7], **sampling)], work={"r": 3},
                        owners=[0], blocks=[1]))
    runner.execute(plan(2, work={"r": 1}))
    assert "r" in runner.grammars
    runner.execute(plan(3, finished=["r"]))  # aborted mid-grammar
    assert "r" not in runner.grammars and len(runner.grammars) == 0
    runner.execute(plan(4, new=[new("s", [5, 6], **sampling)], work={"s": 2},
                        owners=[0], blocks=[2]))
    runner.reset()
    assert len(runner.grammars) == 0


def test_a_preempted_request_resumes_inside_its_grammar(runner: ModelRunner,
                                                        tokenizer: Tokenizer) -> None:
    """Recompute preemption: the request comes back with its outputs; its new
    matcher consumes them before the next mask, so the text stays valid."""
    runner.reset()
    engine = LocalEngine(runner, chunk_size=16)
    engine.add("p", tokenizer.encode("JSON:").ids,
               constrained(runner, json_schema_grammar(SCHEMA), seed=11))
    for _ in range(8):
        engine.step()
    engine.preempt("p")
    ids = engine.run()["p"]
    jsonschema.validate(json.loads(tokenizer.decode(ids[:-1])), SCHEMA)


def test_the_mask_sets_only_disallowed_logits_to_minus_inf() -> None:
    logits = torch.zeros(3, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # tokens 0 and 2
    bitmask[1, 2] = 1 << 3  # token 67
    bitmask[1, 0] = -(1 << 31)  # token 31 (bit 31 of a signed word)
    StepMask(torch.tensor([0, 2]), bitmask).apply(logits)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(logits[1]).all()
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [31, 67]


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cpu-kernels", marks=pytest.mark.skipif(
        not INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_a_constrained_request_launched_ahead_equals_sequential(device: str) -> None:
    """Step N+1 is launched before step N is collected: the constrained request's
    last token is still on the device, so the worker waits for N's ids before its
    mask; the tokens equal strictly sequential execution, and follow the grammar."""
    outputs = []
    for overlapped in (False, True):
        runner = ModelRunner(ensure_embedded_model(), device.removesuffix("-kernels"),
                             "float32", num_kv_blocks=64, block_size=4,
                             kernels=True if device == "cpu-kernels" else None)
        grammar = _fields(constrained(runner, regex_grammar("[a-z]{6,}"), seed=5))
        plans = [plan(1, new=[new("a", [5, 6, 7, 8, 9], **grammar), new("b", [3, 4])],
                      work={"a": 5, "b": 2}, owners=[0, 0, 1], blocks=[10, 11, 20])]
        plans += [plan(step, work={"a": 1, "b": 1}, owners=[0, 1],
                       blocks=[30 + step, 45 + step]) for step in range(2, 8)]
        results = []
        if overlapped:
            launched = runner.launch(plans[0])
            for following in plans[1:]:
                next_launched = runner.launch(following)
                results.append(runner.collect(launched))
                launched = next_launched
            results.append(runner.collect(launched))
        else:
            results = [runner.execute(p) for p in plans]
        assert all(r.error is None for r in results), [r.error for r in results]
        outputs.append([(r.request_ids, list(memoryview(r.token_ids).cast("i")))
                        for r in results])
    assert outputs[0] == outputs[1]
    tokenizer = Tokenizer.from_file(str(ensure_embedded_model() / "tokenizer.json"))
    text = tokenizer.decode([ids[r.index("a")] for r, ids in outputs[0]])
    assert re.fullmatch("[a-z]{6,}", text), text


def _fields(params: SamplingParams) -> dict[str, object]:
    return {f: getattr(params, f) for f in params.__struct_fields__}
