"""OpenAI request bodies -> GenerateRequests: decoding, validation, vLLM-like
defaults, and the 400/404 errors clients see."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from services.api.config import ApiConfig
from services.api.errors import ApiError, from_decode_error
from services.api.generation_plan import (
    GenerationPlan,
    PlanContext,
    plan_chat,
    plan_completion,
)
from services.api.openai_schema import ChatCompletionRequest, CompletionRequest, decode_body
from shared.protocol.envelope import unpack_i32
from shared.protocol.generation import ChatMessage

SERVED = "tiny"
CONFIG = ApiConfig()


def completion(**body: Any) -> GenerationPlan:
    body.setdefault("model", SERVED)
    body.setdefault("prompt", "hi")
    parsed = decode_body(msgspec.json.encode(body), CompletionRequest)
    return plan_completion(parsed, PlanContext(served_model=SERVED, config=CONFIG,
                                               response_id="cmpl-1", created=100))


def chat(**body: Any) -> GenerationPlan:
    body.setdefault("model", SERVED)
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    parsed = decode_body(msgspec.json.encode(body), ChatCompletionRequest)
    return plan_chat(parsed, PlanContext(served_model=SERVED, config=CONFIG,
                                         response_id="chatcmpl-1", created=100))


def error_of(make: Any, **body: Any) -> ApiError:
    with pytest.raises(ApiError) as raised:
        make(**body)
    return raised.value


def test_completion_defaults_follow_openai_and_vllm() -> None:
    plan = completion()
    assert plan.operation == "text_completion" and plan.model == SERVED
    assert not plan.stream and not plan.include_usage
    [request] = plan.requests
    assert request.request_id == "cmpl-1"
    assert request.prompt == "hi" and request.prompt_token_ids is None
    assert request.messages is None
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (
        16, 1.0, 1.0, 0)
    assert sampling.seed is None and sampling.min_tokens == 0 and not sampling.ignore_eos
    assert request.detokenize.stop == [] and request.detokenize.skip_special_tokens


def test_chat_defaults_generate_until_the_context_limit() -> None:
    plan = chat()
    assert plan.operation == "chat"
    [request] = plan.requests
    assert request.messages == [ChatMessage("user", "hi")] and request.prompt is None
    assert request.sampling.max_tokens == CONFIG.chat_max_tokens_default
    assert request.add_generation_prompt


def test_model_may_be_omitted_but_not_wrong() -> None:
    assert completion(model=None).model == SERVED
    error = error_of(chat, model="gpt-4o")
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert error.body().error.type == "not_found_error"


def test_sampling_fields_and_extensions_map_through() -> None:
    [request] = completion(
        max_tokens=7, temperature=0, top_p=0.5, top_k=40, seed=3, min_tokens=2,
        ignore_eos=True, stop_token_ids=[5], include_stop_str_in_output=True,
        skip_special_tokens=False, priority=2,
    ).requests
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (7, 0.0, 0.5, 40, 3)
    assert (s.min_tokens, s.ignore_eos, s.stop_token_ids) == (2, True, [5])
    assert request.detokenize.include_stop_str_in_output
    assert not request.detokenize.skip_special_tokens
    assert request.priority == 2
    assert completion(top_k=-1).requests[0].sampling.top_k == 0


def test_stop_is_a_string_or_a_list() -> None:
    assert completion(stop="END").requests[0].detokenize.stop == ["END"]
    assert completion(stop=["a", "b"]).requests[0].detokenize.stop == ["a", "b"]
    assert error_of(completion, stop=[""]).param == "stop"


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5).sampling.max_tokens == 5
    assert chat(max_tokens=5, max_completion_tokens=9).sampling.max_tokens == 9
    assert error_of(chat, max_completion_tokens=0).param == "max_completion_tokens"


def test_prompt_as_token_ids_and_single_element_batches() -> None:
    [request] = completion(prompt=[1, 2, 3]).requests
    assert request.prompt is None and request.prompt_token_ids is not None
    assert list(unpack_i32(request.prompt_token_ids)) == [1, 2, 3]
    assert completion(prompt=["only"]).requests[0].prompt == "only"
    ids = completion(prompt=[[4, 5]]).requests[0].prompt_token_ids
    assert ids is not None and list(unpack_i32(ids)) == [4, 5]


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]], [], [-1], [1, "a"], [[]]])
def test_bad_prompts_are_400(prompt: Any) -> None:
    error = error_of(completion, prompt=prompt)
    assert error.status == 400 and error.param == "prompt"


def test_n_fans_out_with_distinct_ids_and_seeds() -> None:
    plan = completion(n=3, seed=10)
    assert [r.request_id for r in plan.requests] == ["cmpl-1-0", "cmpl-1-1", "cmpl-1-2"]
    assert [r.sampling.seed for r in plan.requests] == [10, 11, 12]
    unseeded = completion(n=2)
    assert [r.sampling.seed for r in unseeded.requests] == [None, None]
    assert error_of(completion, n=0).param == "n"
    assert error_of(completion, n=CONFIG.max_n + 1).param == "n"


def test_n_choices_reach_the_mesh_as_one_request_that_forks() -> None:
    mesh = completion(n=3, seed=10).mesh_request
    assert (mesh.request_id, mesh.n, mesh.sampling.seed) == ("cmpl-1", 3, 10)
    single = completion(seed=10)
    assert single.mesh_request is single.requests[0] and single.mesh_request.n == 1


def test_cache_salt_maps_through() -> None:
    assert completion(cache_salt="tenant-a").mesh_request.cache_salt == "tenant-a"
    assert chat(cache_salt="t", n=2).mesh_request.cache_salt == "t"
    assert completion().mesh_request.cache_salt == ""
    assert error_of(completion, cache_salt="").param == "cache_salt"


def test_chat_content_parts_are_joined_text() -> None:
    plan = chat(messages=[
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"},
    ])
    assert plan.requests[0].messages == [
        ChatMessage("system", "sys"), ChatMessage("user", "a\nb"), ChatMessage("assistant", "ok")]


@pytest.mark.parametrize(("messages", "param"), [
    ([], "messages"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
])
def test_bad_messages_are_400(messages: Any, param: str) -> None:
    error = error_of(chat, messages=messages)
    assert error.status == 400 and error.param == param


@pytest.mark.parametrize(("make", "field", "value"), [
    (completion, "temperature", -0.1),
    (completion, "top_p", 0),
    (completion, "top_p", 1.5),
    (completion, "top_k", -2),
    (completion, "min_tokens", 17),
    (completion, "logprobs", 21),
    (completion, "logprobs", -1),
    (completion, "prompt_logprobs", 21),
    (completion, "suffix", "x"),
    (completion, "best_of", 3),
    (completion, "presence_penalty", 2.5),
    (completion, "frequency_penalty", -3),
    (completion, "repetition_penalty", 0),
    (completion, "min_p", 1.5),
    (completion, "logit_bias", {"x": 2.0}),
    (completion, "logit_bias", {"1": 200.0}),
    (completion, "bad_words", [" "]),
    (completion, "max_tokens", 0),  # only with echo
    (completion, "use_beam_search", True),
    (completion, "length_penalty", 0.5),
    (completion, "allowed_token_ids", [1, 2]),
    (completion, "truncate_prompt_tokens", 4),
    (completion, "return_tokens_as_token_ids", True),
    (completion, "spaces_between_special_tokens", False),
    (completion, "stop", ["x" * 1025]),
    (completion, "stop", [str(i) for i in range(65)]),
    (completion, "return_token_ids", True),
    (completion, "request_id", "mine"),
    (completion, "kv_transfer_params", {"do_remote_decode": True}),
    (completion, "vllm_xargs", {"x": 1}),
    (completion, "add_special_tokens", False),
    (completion, "prompt_embeds", "AAAA"),
    (chat, "chat_template", "{{ messages }}"),
    (chat, "chat_template_kwargs", {"enable_thinking": False}),
    (chat, "continue_final_message", True),
    (chat, "documents", [{"text": "d"}]),
    (chat, "mm_processor_kwargs", {"x": 1}),
    (chat, "reasoning_effort", "low"),
    (chat, "include_reasoning", False),
    (completion, "stream_options", {"include_usage": True}),  # without stream
    (chat, "top_logprobs", 2),  # without logprobs
    (chat, "echo", True),
    (chat, "tool_choice", "sometimes"),
    (chat, "response_format", {"type": "structural_tag"}),
])
def test_unsupported_or_invalid_parameters_name_themselves(make: Any, field: str,
                                                           value: Any) -> None:
    error = error_of(make, **{field: value})
    assert error.status == 400 and error.param == field
    assert error.body().error.type == "invalid_request_error"


def test_stream_options_include_usage() -> None:
    plan = chat(stream=True, stream_options={"include_usage": True})
    assert plan.stream and plan.include_usage


def test_decode_errors_become_400_with_the_field() -> None:
    with pytest.raises(msgspec.ValidationError) as wrong:
        decode_body(b'{"model": "tiny", "prompt": "x", "max_tokens": "many"}',
                    CompletionRequest)
    error = from_decode_error(wrong.value)
    assert (error.status, error.param) == (400, "max_tokens")
    assert "Expected `int | null`, got `str`" in error.message

    with pytest.raises(msgspec.ValidationError) as missing:
        decode_body(b'{"model": "tiny"}', CompletionRequest)
    assert "prompt" in from_decode_error(missing.value).message

    with pytest.raises(msgspec.DecodeError) as malformed:
        decode_body(b"{nope", CompletionRequest)
    error = from_decode_error(malformed.value)
    assert (error.status, error.code) == (400, "invalid_json")

    with pytest.raises(msgspec.ValidationError) as nested:
        decode_body(b'{"messages": [{"role": "user", "content": 5}]}', ChatCompletionRequest)
    assert from_decode_error(nested.value).param == "messages[0].content"


def test_unknown_fields_are_accepted() -> None:
    assert completion(user="me", some_future_field={"x": 1}).requests


def test_span_attributes_follow_genai_conventions() -> None:
    attributes = chat(max_tokens=5, temperature=0.5, top_p=0.9).span_attributes()
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == SERVED
    assert attributes["gen_ai.request.max_tokens"] == 5
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.request.top_p"] == 0.9


def test_sampling_extensions_reach_the_sampling_params() -> None:
    plan = completion(presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.3,
                      min_p=0.1, logit_bias={"7": -100, "9": 2.5}, bad_words=["no"],
                      logprobs=3, prompt_logprobs=2)
    sampling = plan.sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.25)
    assert (sampling.repetition_penalty, sampling.min_p) == (1.3, 0.1)
    assert sampling.logit_bias == {7: -100.0, 9: 2.5} and sampling.bad_words == ["no"]
    assert (sampling.logprobs, sampling.prompt_logprobs) == (3, 2)
    assert plan.logprobs and plan.show_prompt_logprobs and not plan.echo


def test_echo_with_logprobs_asks_for_the_prompts_and_allows_max_tokens_0() -> None:
    plan = completion(echo=True, logprobs=2, max_tokens=0)
    assert plan.echo and plan.requests[0].detokenize.echo
    assert (plan.sampling.logprobs, plan.sampling.prompt_logprobs) == (2, 2)
    assert plan.sampling.max_tokens == 0 and not plan.show_prompt_logprobs
    assert completion().sampling.logprobs == -1


def test_chat_logprobs_and_top_logprobs() -> None:
    assert chat(logprobs=True).sampling.logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).sampling.logprobs == 5
    assert chat().sampling.logprobs == -1
