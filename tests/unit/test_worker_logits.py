"""The sampler's extras: penalties match vLLM's formulas, min_p / logit_bias / bad
words cut what they should, and logprobs (sampled and prompt) equal transformers'
``log_softmax`` on the same weights, top-k order included. Through ``ModelRunner``
on the reference path, on the kernel path under Triton's interpreter, and on CUDA
when there is one."""

from __future__ import annotations

import importlib.util
import os
from array import array

import pytest
import torch

from services.worker.logits_processing import (
    LogitAdjustments,
    PenaltyTable,
    apply_min_p,
    banned_tokens,
)
from services.worker.runner import ModelRunner
from services.worker.sampling import validate_sampling
from shared.embedded_model import ensure_embedded_model
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import SamplingParams
from shared.protocol.step import NewRequest, StepBatch, StepPlan, StepResult
from tests.sampling_reference import (
    greedy_with_penalties,
    load_oracle,
    oracle_logits,
    vllm_penalties,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton")
DEVICES = [
    "cpu",
    pytest.param("cpu-kernels", marks=pytest.mark.skipif(
        not INTERPRETED, reason="needs TRITON_INTERPRET=1 and triton")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
]
PROMPT = [5, 17, 300, 41, 999, 7, 7, 123, 64, 5, 17, 88, 250]


@pytest.fixture(scope="module")
def oracle():  # type: ignore[no-untyped-def]
    return load_oracle(ensure_embedded_model())


def make_runner(device: str) -> ModelRunner:
    return ModelRunner(ensure_embedded_model(), device.removesuffix("-kernels"), "float32",
                       num_kv_blocks=64, block_size=4,
                       kernels=True if device == "cpu-kernels" else None)


def run(runner: ModelRunner, prompt: list[int], params: SamplingParams, steps: int,
        chunk: int = 5) -> list[StepResult]:
    """Prefill ``prompt`` in chunks, then decode; every step collected before the next
    is launched except that decode N+1 launches before N is collected (the device
    feed), as the worker service does."""
    runner.reset()
    plans: list[StepPlan] = []
    done, blocks, step = 0, 0, 0
    total = len(prompt) + steps
    while done < len(prompt):
        n = min(chunk, len(prompt) - done)
        need = -(-(done + n) // 4) - blocks
        plans.append(StepPlan(step, new=[NewRequest("r", pack_i32(prompt), 0, params)]
                              if step == 0 else [],
                              batch=StepBatch.pack(["r"], [n], [list(range(blocks,
                                                                           blocks + need))])))
        blocks += need
        done += n
        step += 1
    for position in range(len(prompt), total - 1):
        need = -(-(position + 1) // 4) - blocks
        plans.append(StepPlan(step, batch=StepBatch.pack(["r"], [1], [list(range(
            blocks, blocks + need))])))
        blocks += need
        step += 1
    results = []
    pending = None
    for p in plans:
        launched = runner.launch(p)
        if pending is not None:
            results.append(runner.collect(pending))
        pending = launched
    results.append(runner.collect(pending))  # type: ignore[arg-type]
    return results


def outputs_of(results: list[StepResult]) -> list[int]:
    return [t for r in results for t in unpack_i32(r.token_ids)]


# -- pure parts -------------------------------------------------------------------


def test_penalty_table_matches_vllm_formulas() -> None:
    torch.manual_seed(0)
    vocab = 50
    table = PenaltyTable(vocab, torch.device("cpu"))
    cases = [([1, 2, 3], [3, 3, 4], 0.5, 0.25, 1.3), ([9, 9], [], 0.0, 0.0, 0.7),
             ([0], [5, 6, 5, 5], -0.5, 1.0, 1.0)]
    params = []
    for i, (prompt, outputs, presence, frequency, repetition) in enumerate(cases):
        table.add(f"r{i}", prompt, outputs)
        params.append(SamplingParams(presence_penalty=presence, frequency_penalty=frequency,
                                     repetition_penalty=repetition))
    logits = torch.randn(len(cases), vocab) * 3
    got = table.apply(logits, table.slots(["r0", "r1", "r2"]), params)
    for i, (prompt, outputs, presence, frequency, repetition) in enumerate(cases):
        want = vllm_penalties(logits[i], prompt, outputs, presence, frequency, repetition)
        torch.testing.assert_close(got[i], want)
    # Sampled tokens are counted on the device; a dropped slot is reused clean.
    table.record(table.slots(["r1"]), torch.tensor([7]))
    assert int(table.output_counts[table.slots(["r1"])[0], 7]) == 1
    table.drop("r1")
    table.add("r3", [], [])
    slot = table.slots(["r3"])[0]
    assert int(table.output_counts[slot].sum()) == 0 and not bool(table.prompt_seen[slot].any())


def test_bad_words_ban_single_tokens_always_and_the_last_of_a_matching_prefix() -> None:
    params = SamplingParams(bad_words_token_ids=[[4], [7, 8, 9]])
    assert banned_tokens(params, []) == [4]
    assert banned_tokens(params, [1, 7]) == [4]
    assert banned_tokens(params, [1, 7, 8]) == [4, 9]


def test_logit_bias_and_bans_leave_the_raw_logits_alone() -> None:
    raw = torch.zeros(2, 6)
    adjust = LogitAdjustments()
    adjust.add_row(0, SamplingParams(logit_bias={2: 5.0, 3: -100.0}), [1])
    adjust.add_row(1, SamplingParams(), [0, 5])
    out = adjust.apply(raw, PenaltyTable(6, torch.device("cpu")))
    assert out[0].tolist() == [0.0, float("-inf"), 5.0, -100.0, 0.0, 0.0]
    assert out[1].tolist() == [float("-inf"), 0.0, 0.0, 0.0, 0.0, float("-inf")]
    assert raw.abs().sum() == 0


def test_min_p_keeps_tokens_at_least_min_p_times_the_best() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = apply_min_p(logits, [0.5, 0.0])
    assert torch.isinf(out[0]).tolist() == [False, False, True, True]
    assert not torch.isinf(out[1]).any()


def test_validation_names_the_field() -> None:
    assert "min_p" in (validate_sampling(SamplingParams(min_p=2.0)) or "")
    assert "repetition_penalty" in (validate_sampling(SamplingParams(repetition_penalty=0))
                                    or "")
    assert "logprobs" in (validate_sampling(SamplingParams(logprobs=21)) or "")
    assert validate_sampling(SamplingParams(logit_bias={99: 1.0}), vocab_size=50) is not None
    assert validate_sampling(SamplingParams(logit_bias={9: 1.0}), vocab_size=50) is None


# -- through the runner, against transformers ----------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_equal_transformers_log_softmax(device: str, oracle) -> None:  # type: ignore[no-untyped-def]
    runner = make_runner(device)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, prompt_logprobs=4)
    results = run(runner, PROMPT, params, steps=6)
    outputs = outputs_of(results)
    reference = torch.log_softmax(oracle_logits(oracle, PROMPT + outputs), dim=-1)
    # Prompt rows: positions 1.. of the prompt, each once, in order.
    prompt_rows = [lp for r in results for _, lp in r.prompt_logprobs]
    assert prompt_rows[0].start == 1
    assert sum(lp.num_rows for lp in prompt_rows) == len(PROMPT) - 1
    for chunk in prompt_rows:
        ids, values, ranks = chunk.unpack()
        for row in range(chunk.num_rows):
            position = chunk.start + row
            want = reference[position - 1]
            at = row * chunk.width
            assert ids[at] == PROMPT[position]
            assert abs(values[at] - float(want[PROMPT[position]])) < 1e-4
            top = want.topk(4)
            assert list(ids[at + 1: at + 5]) == top.indices.tolist()
            assert max(abs(a - b) for a, b in zip(values[at + 1: at + 5],
                                                   top.values.tolist(), strict=True)) < 1e-4
            assert ranks[row] == int((want >= want[PROMPT[position]]).sum())
    sampled = [(r, lp) for r in results for _, lp in r.logprobs]
    assert len(sampled) == len(outputs) == 6
    for k, (_, chunk) in enumerate(sampled):
        ids, values, ranks = chunk.unpack()
        want = reference[len(PROMPT) - 1 + k]
        assert chunk.start == len(PROMPT) + k and ids[0] == outputs[k] and ranks[0] == 1
        top = want.topk(5)
        assert list(ids[1:]) == top.indices.tolist()
        assert max(abs(a - b) for a, b in zip(values, [float(want[outputs[k]]),
                                                        *top.values.tolist()], strict=True)) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_vllm_token_for_token(device: str, oracle) -> None:  # type: ignore[no-untyped-def]
    runner = make_runner(device)
    for presence, frequency, repetition in [(1.5, 0.0, 1.0), (0.0, 1.0, 1.0),
                                            (0.0, 0.0, 1.8), (0.4, 0.3, 1.2)]:
        params = SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=presence,
                                frequency_penalty=frequency, repetition_penalty=repetition)
        got = outputs_of(run(runner, PROMPT, params, steps=12))
        want = greedy_with_penalties(oracle, PROMPT, 12, presence, frequency, repetition)
        assert got == want, (presence, frequency, repetition)
    plain = outputs_of(run(runner, PROMPT, SamplingParams(max_tokens=12, temperature=0.0),
                           steps=12))
    assert plain != got  # the penalties changed something


def test_logit_bias_and_bad_words_steer_greedy_decoding(oracle) -> None:  # type: ignore[no-untyped-def]
    runner = make_runner("cpu")
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    plain = outputs_of(run(runner, PROMPT, greedy, steps=8))
    first = plain[0]
    biased = outputs_of(run(runner, PROMPT, SamplingParams(
        max_tokens=8, temperature=0.0, logit_bias={first: -100.0, 42: 100.0}), steps=8))
    assert biased[0] == 42 and first not in biased[:1]
    banned = outputs_of(run(runner, PROMPT, SamplingParams(
        max_tokens=8, temperature=0.0, bad_words_token_ids=[[t] for t in set(plain)]), steps=8))
    assert not set(banned) & set(plain)
    # A two-token word: its second token is banned only right after its first.
    pair = [plain[0], plain[1]]
    cut = outputs_of(run(runner, PROMPT, SamplingParams(
        max_tokens=8, temperature=0.0, bad_words_token_ids=[pair]), steps=8))
    assert cut[0] == plain[0] and cut[1] != plain[1]


def test_seeded_sampling_with_penalties_and_min_p_repeats_itself() -> None:
    runner = make_runner("cpu")
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, min_p=0.05,
                            repetition_penalty=1.3, presence_penalty=0.2)
    alone = outputs_of(run(runner, PROMPT, params, steps=10))
    again = outputs_of(run(runner, PROMPT, params, steps=10))
    assert alone == again
    packed = array("i", alone)
    assert len(packed) == 10
