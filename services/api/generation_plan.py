"""OpenAI request bodies -> the mesh's ``GenerateRequest``s, with every check that
can be made without the model.

Defaults follow vLLM's OpenAI server:

- ``temperature`` 1.0, ``top_p`` 1.0, ``top_k`` off (0; ``-1`` means off too).
- completions: ``max_tokens`` 16 (OpenAI's default, ``ApiConfig.max_tokens_default``).
- chat: no ``max_tokens`` / ``max_completion_tokens`` means "until the context
  limit": ``ApiConfig.chat_max_tokens_default`` is a cap far above any context
  length, and the scheduler ends the request with ``length`` at ``max_model_len``.
  ``max_completion_tokens`` wins over the deprecated ``max_tokens``.
- ``n`` > 1: choices ``<id>-<i>`` (``seed + i`` when seeded, so the choices differ
  but each is reproducible; shared/protocol/choices.py is the rule every service
  follows); ``n == 1`` keeps the response id. The mesh gets one
  ``GenerateRequest`` with ``n`` (``mesh_request``): the prompt is encoded and
  computed once, and the choices fork copy-on-write at the scheduler.
- ``cache_salt`` (vLLM's extension) keys the prefix cache: requests under
  different salts never share cached blocks.

- Sampling: ``presence_penalty``/``frequency_penalty`` (-2..2), vLLM's
  ``repetition_penalty`` (> 0) and ``min_p`` (0..1), ``logit_bias`` (-100..100 per
  token id; ids the tokenizer checks), vLLM's ``bad_words``.
- Structured outputs: ``response_format`` (``json_object``, ``json_schema``),
  vLLM's ``structured_outputs`` and ``guided_*`` (``structured_request.py``).
- Logprobs: completions ``logprobs`` 0..20; chat ``logprobs`` + ``top_logprobs``
  0..20; vLLM's ``prompt_logprobs`` 0..20. Completions' ``echo`` prepends the
  prompt (with ``logprobs``, its tokens' logprobs too: ``prompt_logprobs`` =
  ``logprobs``); only ``echo`` allows ``max_tokens`` 0. Prompt logprobs with
  ``n`` > 1 are served unstreamed only (the prompt is computed by one choice).

- Tools (chat): ``tools``, ``tool_choice``, ``parallel_tool_calls`` and the tool
  messages of the history, checked by ``tool_plan``; "required" and named choices
  carry the grammar that forces a call.

Everything meshserve does not implement (beam search, ...) is a 400 naming the
parameter, rather than a response that silently ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from services.api.config import ApiConfig
from services.api.errors import ApiError, bad_request
from services.api.openai_schema import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    ResponseFormat,
    SamplingFields,
)
from services.api.structured_request import structured_grammar
from services.api.tool_plan import history_calls, plan_tools
from shared.protocol.choices import choice_ids, choice_sampling
from shared.protocol.envelope import pack_i32
from shared.protocol.generation import (
    ChatMessage,
    DetokenizeSpec,
    GenerateRequest,
    SamplingParams,
    stop_strings_problem,
)
from shared.protocol.tools import ToolCalling, ToolFunction

Operation = Literal["text_completion", "chat"]

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_INT32_MAX = 2**31 - 1
MAX_LOGPROBS = 20  # OpenAI's limit (and vLLM's default --max-logprobs)


@dataclass(frozen=True, slots=True)
class GenerationPlan:
    """One HTTP request, validated: what to send to the mesh and how to answer."""

    operation: Operation
    response_id: str
    model: str
    created: int
    stream: bool
    include_usage: bool
    requests: list[GenerateRequest]  # one per choice, in choice order
    logprobs: bool = False  # the response carries output logprobs
    echo: bool = False  # completions: the prompt's text (and logprobs) come first
    show_prompt_logprobs: bool = False  # vLLM's ``prompt_logprobs`` field

    def echo_prefix(self, echo: tuple[str, str] | None) -> str:
        """The echoed prompt text: the client's own string, else the tokenizer's
        decoding of the prompt ids (``echo`` as the mesh sent it)."""
        if not self.echo or echo is None:
            return ""
        prompt = self.requests[0].prompt
        return prompt if prompt is not None else echo[0]

    @property
    def sampling(self) -> SamplingParams:
        return self.requests[0].sampling

    @property
    def mesh_request(self) -> GenerateRequest:
        """The one message the mesh gets for this HTTP request. With n > 1 it carries
        the response id and ``n``; the scheduler forks it into the choice ids
        ``<response_id>-<i>`` that ``requests`` lists (and adds ``i`` to the seed)."""
        first = self.requests[0]
        if len(self.requests) == 1:
            return first
        return msgspec.structs.replace(first, request_id=self.response_id,
                                       n=len(self.requests))

    def span_attributes(self) -> dict[str, str | int | float | bool]:
        """The OTel GenAI request attributes of this request's server span."""
        sampling = self.sampling
        return {
            "gen_ai.operation.name": self.operation,
            "gen_ai.request.model": self.model,
            "gen_ai.request.max_tokens": sampling.max_tokens,
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p,
            "gen_ai.request.choice.count": len(self.requests),
            "gen_ai.response.id": self.response_id,
            "meshserve.stream": self.stream,
        }


def check_model(requested: str | None, served: str) -> None:
    """Unknown model -> 404 ``model_not_found``, as OpenAI answers."""
    if requested is not None and requested != served:
        raise ApiError(
            404,
            f"The model `{requested}` does not exist. This server serves `{served}`.",
            code="model_not_found",
            param="model",
        )


@dataclass(frozen=True, slots=True)
class PlanContext:
    """What a plan needs besides the body: the served model, the api's limits, and
    the new response's id and creation time (chosen by the HTTP layer)."""

    served_model: str
    config: ApiConfig
    response_id: str
    created: int


def plan_completion(body: CompletionRequest, context: PlanContext) -> GenerationPlan:
    config = context.config
    check_model(body.model, context.served_model)
    if body.suffix is not None:
        raise bad_request("`suffix` is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("`best_of` other than `n` is not supported", "best_of")
    max_tokens = body.max_tokens if body.max_tokens is not None else config.max_tokens_default
    sampling = _sampling(body, max_tokens, "max_tokens", config, echo=body.echo,
                         response_format=body.response_format)
    logprobs = _logprobs_count(body.logprobs, "logprobs")
    if body.echo and logprobs >= 0:
        sampling = msgspec.structs.replace(
            sampling, prompt_logprobs=max(sampling.prompt_logprobs, logprobs))
    sampling = msgspec.structs.replace(sampling, logprobs=logprobs)
    prompt, prompt_ids = _prompt(body.prompt)
    return _plan("text_completion", body, context, sampling,
                 prompt=prompt, prompt_token_ids=prompt_ids, echo=body.echo)


def plan_chat(body: ChatCompletionRequest, context: PlanContext) -> GenerationPlan:
    config = context.config
    check_model(body.model, context.served_model)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("`top_logprobs` needs `logprobs` true", "top_logprobs")
    if body.echo:
        raise bad_request("`echo` is not supported for chat", "echo")
    tools, tool_calling, tool_grammar = plan_tools(body)
    if body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    elif body.max_tokens is not None:
        max_tokens, param = body.max_tokens, "max_tokens"
    else:
        max_tokens, param = config.chat_max_tokens_default, "max_tokens"
    sampling = _sampling(body, max_tokens, param, config,
                         response_format=body.response_format)
    if body.logprobs:
        sampling = msgspec.structs.replace(
            sampling, logprobs=_logprobs_count(body.top_logprobs or 0, "top_logprobs"))
    if tool_grammar:
        if sampling.grammar:
            raise bad_request("`tool_choice` 'required' or a named function cannot be "
                              "combined with another structured output", "tool_choice")
        sampling = msgspec.structs.replace(sampling, grammar=tool_grammar,
                                           grammar_field="tool_choice")
    messages = _messages(body.messages)
    return _plan("chat", body, context, sampling, messages=messages,
                 add_generation_prompt=body.add_generation_prompt, tools=tools,
                 tool_calling=tool_calling)


def _plan(
    operation: Operation,
    body: SamplingFields,
    context: PlanContext,
    sampling: SamplingParams,
    *,
    prompt: str | None = None,
    prompt_token_ids: bytes | None = None,
    messages: list[ChatMessage] | None = None,
    add_generation_prompt: bool = True,
    echo: bool = False,
    tools: list[ToolFunction] | None = None,
    tool_calling: ToolCalling | None = None,
) -> GenerationPlan:
    """The plan both endpoints make from a validated body; the prompt arguments say
    what the tokenizer encodes (a prompt, its ids, or chat messages)."""

    def request(request_id: str, params: SamplingParams) -> GenerateRequest:
        return GenerateRequest(
            request_id=request_id,
            sampling=params,
            detokenize=msgspec.structs.replace(_detokenize(body), echo=echo),
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            priority=body.priority,
            cache_salt=_cache_salt(body),
            tools=tools,
            tool_calling=tool_calling,
        )

    if (sampling.prompt_logprobs >= 0 and body.n > 1 and body.stream):
        raise bad_request("prompt logprobs with `n` > 1 are served unstreamed only", "n")
    return GenerationPlan(
        logprobs=sampling.logprobs >= 0,
        echo=echo,
        show_prompt_logprobs=body.prompt_logprobs is not None,
        operation=operation,
        response_id=context.response_id,
        model=context.served_model,
        created=context.created,
        stream=body.stream,
        include_usage=_include_usage(body),
        requests=[
            request(request_id, choice_sampling(sampling, i))
            for i, request_id in enumerate(choice_ids(context.response_id, body.n))
        ],
    )


def _sampling(
    body: SamplingFields, max_tokens: int, max_tokens_param: str, config: ApiConfig,
    echo: bool = False,
    response_format: ResponseFormat | None = None,
) -> SamplingParams:
    if not 1 <= body.n <= config.max_n:
        raise bad_request(f"`n` must be between 1 and {config.max_n}, got {body.n}", "n")
    if max_tokens < (0 if echo else 1):
        raise bad_request(f"`{max_tokens_param}` must be at least 1 (0 only with `echo`), "
                          f"got {max_tokens}", max_tokens_param)
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < 0:
        raise bad_request(f"`temperature` must be >= 0, got {temperature}", "temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"`top_p` must be in (0, 1], got {top_p}", "top_p")
    top_k = 0 if body.top_k is None or body.top_k == -1 else body.top_k
    if top_k < 0:
        raise bad_request(f"`top_k` must be -1 (off), 0 (off) or positive, got {top_k}", "top_k")
    if not 0 <= body.min_tokens <= max_tokens:
        raise bad_request(
            f"`min_tokens` must be between 0 and `{max_tokens_param}` ({max_tokens}), "
            f"got {body.min_tokens}",
            "min_tokens",
        )
    _reject_unsupported(body)
    if body.stream_options is not None and not body.stream:
        raise bad_request("`stream_options` is only allowed when `stream` is true",
                          "stream_options")
    stop_token_ids = list(body.stop_token_ids or [])
    if any(not 0 <= t <= _INT32_MAX for t in stop_token_ids):
        raise bad_request("`stop_token_ids` must be non-negative token ids", "stop_token_ids")
    grammar, grammar_field = structured_grammar(body, response_format)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=body.seed,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        stop_token_ids=stop_token_ids,
        prompt_logprobs=(-1 if body.prompt_logprobs is None
                         else _logprobs_count(body.prompt_logprobs, "prompt_logprobs")),
        **_penalties(body),
        grammar=grammar,
        grammar_field=grammar_field,
    )


# vLLM request fields meshserve does not implement, with the value that means
# "not used": any other value is a 400 naming the field.
UNSUPPORTED: dict[str, object] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "allowed_token_ids": None,
    "truncate_prompt_tokens": None,
    "return_tokens_as_token_ids": False,
    "spaces_between_special_tokens": True,
    "logits_processors": None,
    "return_token_ids": False,
    "request_id": None,
    "kv_transfer_params": None,
    "vllm_xargs": None,
}
UNSUPPORTED_COMPLETION: dict[str, object] = {"add_special_tokens": True, "prompt_embeds": None}
UNSUPPORTED_CHAT: dict[str, object] = {
    "chat_template": None,
    "chat_template_kwargs": None,
    "continue_final_message": False,
    "documents": None,
    "mm_processor_kwargs": None,
    "reasoning_effort": None,
    "include_reasoning": True,
}


def _reject_unsupported(body: SamplingFields) -> None:
    specific = (UNSUPPORTED_CHAT if isinstance(body, ChatCompletionRequest)
                else UNSUPPORTED_COMPLETION)
    for name, unused in (*UNSUPPORTED.items(), *specific.items()):
        if getattr(body, name) != unused:
            raise bad_request(f"`{name}` is not supported", name)


def _logprobs_count(value: int | None, param: str) -> int:
    """-1 for None (not asked), else the number of top logprobs, checked."""
    if value is None:
        return -1
    if not 0 <= value <= MAX_LOGPROBS:
        raise bad_request(f"`{param}` must be between 0 and {MAX_LOGPROBS}, got {value}", param)
    return value


def _penalties(body: SamplingFields) -> dict[str, Any]:
    """The penalty, min_p, logit_bias and bad_words fields of SamplingParams."""
    out: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None:
            if not -2.0 <= value <= 2.0:
                raise bad_request(f"`{name}` must be between -2 and 2, got {value}", name)
            out[name] = value
    if body.repetition_penalty is not None:
        if not body.repetition_penalty > 0:
            raise bad_request("`repetition_penalty` must be > 0, got "
                              f"{body.repetition_penalty}", "repetition_penalty")
        out["repetition_penalty"] = body.repetition_penalty
    if body.min_p is not None:
        if not 0.0 <= body.min_p <= 1.0:
            raise bad_request(f"`min_p` must be between 0 and 1, got {body.min_p}", "min_p")
        out["min_p"] = body.min_p
    if body.logit_bias:
        bias: dict[int, float] = {}
        for key, value in body.logit_bias.items():
            if not key.isdigit() or int(key) > _INT32_MAX:
                raise bad_request(f"`logit_bias` keys must be token ids, got {key!r}",
                                  "logit_bias")
            if not -100.0 <= value <= 100.0:
                raise bad_request(f"`logit_bias` values must be between -100 and 100, "
                                  f"got {value}", "logit_bias")
            bias[int(key)] = value
        out["logit_bias"] = bias
    if body.bad_words:
        if any(not w.strip() for w in body.bad_words):
            raise bad_request("`bad_words` must not hold empty words", "bad_words")
        out["bad_words"] = list(body.bad_words)
    return out


def _detokenize(body: SamplingFields) -> DetokenizeSpec:
    if body.stop is None:
        stop: list[str] = []
    elif isinstance(body.stop, str):
        stop = [body.stop]
    else:
        stop = list(body.stop)
    if any(s == "" for s in stop):
        raise bad_request("`stop` strings must not be empty", "stop")
    if problem := stop_strings_problem(stop):
        raise bad_request(f"`stop`: {problem}", "stop")
    return DetokenizeSpec(
        stop=stop,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
    )


def _cache_salt(body: SamplingFields) -> str:
    if body.cache_salt is not None and not body.cache_salt:
        raise bad_request("`cache_salt` must not be empty", "cache_salt")
    return body.cache_salt or ""


def _include_usage(body: SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _prompt(prompt: str | list[int | str | list[int]]) -> tuple[str | None, bytes | None]:
    """(text, packed ids): exactly one is set."""
    if isinstance(prompt, str):
        return prompt, None
    if not prompt:
        raise bad_request("`prompt` must not be empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        return None, _token_ids(prompt)  # type: ignore[arg-type]
    if len(prompt) > 1:
        raise bad_request(
            "batched prompts are not supported: send one prompt (a string or a list of "
            "token ids) per request",
            "prompt",
        )
    only = prompt[0]
    if isinstance(only, str):
        return only, None
    if isinstance(only, list):
        return None, _token_ids(only)
    raise bad_request("`prompt` must be a string or a list of token ids", "prompt")


def _token_ids(ids: list[int]) -> bytes:
    if not ids:
        raise bad_request("`prompt` must not be an empty list of token ids", "prompt")
    if any(not 0 <= t <= _INT32_MAX for t in ids):
        raise bad_request("`prompt` token ids must be non-negative 32-bit integers", "prompt")
    return pack_i32(ids)


def _messages(messages: list[ChatMessageIn]) -> list[ChatMessage]:
    if not messages:
        raise bad_request("`messages` must not be empty", "messages")
    out = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if message.role not in CHAT_ROLES:
            raise bad_request(
                f"unsupported role {message.role!r}; expected one of {sorted(CHAT_ROLES)}",
                f"{param}.role",
            )
        calls = history_calls(message, param)
        content = message.content
        if message.role == "tool" and not message.tool_call_id:
            raise bad_request("a `tool` message needs the `tool_call_id` it answers",
                              f"{param}.tool_call_id")
        if content is None and not calls:
            raise bad_request("message `content` is required", f"{param}.content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"content part of type {part.type!r} is not supported; only "
                        '{"type": "text", "text": ...}',
                        f"{param}.content[{j}]",
                    )
                texts.append(part.text)
            # vLLM joins text parts with newlines; so do we, to tokenize alike.
            content = "\n".join(texts)
        out.append(ChatMessage(role=message.role, content=content, tool_calls=calls,
                               tool_call_id=message.tool_call_id, name=message.name))
    return out
