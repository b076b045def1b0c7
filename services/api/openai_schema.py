"""The HTTP side's structs: OpenAI request bodies (plus vLLM's sampling extensions)
and the response objects, field for field as OpenAI sends them; text first, then
speech (``/v1/audio/speech`` and its SSE events, ``/v1/audio/voices``).

Request structs accept unknown fields (clients send what they like, e.g. ``user``)
but type-check every field they know. Fields meshserve does not implement are
declared anyway, so a request that relies on one gets a clear 400 from
``generation_plan`` instead of silently different output.

Response fields declared ``UNSET`` by default are omitted from the JSON, as OpenAI
omits them (``usage`` on stream chunks unless ``stream_options.include_usage``).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from services.api.audio import DEFAULT_FORMAT, DEFAULT_SAMPLE_RATE
from services.api.errors import ErrorDetail
from services.api.logprob_schema import ChatLogprobs, CompletionLogprobs, PromptLogprobs

# --- requests ---------------------------------------------------------------------


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool = False


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    """One part of a chat message's content; only ``{"type": "text"}`` is served."""

    type: str
    text: str | None = None


class FunctionCallIn(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(msgspec.Struct, frozen=True, kw_only=True):
    """A call an earlier assistant message made (the history of a tool loop)."""

    id: str
    type: str = "function"
    function: FunctionCallIn


class ChatMessageIn(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool: the call this message answers


class FunctionDefinition(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ToolIn(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, frozen=True, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: str
    function: NamedFunction


class JsonSchemaFormat(msgspec.Struct, frozen=True, kw_only=True):
    """``response_format.json_schema``: OpenAI's structured outputs."""

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    type: str  # "text", "json_object" or "json_schema"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, frozen=True, kw_only=True):
    """vLLM's ``structured_outputs``: exactly one constraint of json, regex,
    choice, grammar, json_object (structural_tag is not supported)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class SamplingFields(msgspec.Struct, frozen=True, kw_only=True):
    """What completions and chat share: sampling, stopping, streaming."""

    model: str | None = None  # None: the served model (vLLM accepts that too)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions.
    top_k: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    cache_salt: str | None = None  # prefix-cache isolation key (vLLM)
    repetition_penalty: float | None = None
    min_p: float | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    # Structured outputs (services/api/structured_request.py): vLLM's and its
    # older guided_* fields; ``response_format`` is on each endpoint's body.
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    # vLLM's fields meshserve does not implement: declared so that a request using
    # one gets a 400 naming it (generation_plan.UNSUPPORTED) instead of being ignored.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    return_tokens_as_token_ids: bool = False
    spaces_between_special_tokens: bool = True
    logits_processors: list[Any] | None = None
    return_token_ids: bool = False
    request_id: str | None = None  # (the X-Request-Id header names a request here)
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields, frozen=True, kw_only=True):
    """``POST /v1/completions``. ``prompt``: a string or token ids; a list of
    those (a batch) is accepted only when it holds a single prompt."""

    prompt: str | list[int | str | list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # vLLM takes it here too
    # vLLM's, not implemented: a 400 names them (generation_plan.UNSUPPORTED_COMPLETION).
    add_special_tokens: bool = True
    prompt_embeds: Any | None = None


class ChatCompletionRequest(SamplingFields, frozen=True, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolIn] | None = None
    tool_choice: str | NamedToolChoice | None = None  # None: "auto" with tools, else "none"
    parallel_tool_calls: bool | None = None  # None: true
    response_format: ResponseFormat | None = None
    # vLLM's extension: False continues the last message instead of answering it.
    add_generation_prompt: bool = True
    echo: bool = False  # vLLM's: echo the last message (not implemented: 400)
    # vLLM's, not implemented: a 400 names them (generation_plan.UNSUPPORTED_CHAT).
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False
    documents: list[dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool = True


# --- responses --------------------------------------------------------------------


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET  # vLLM's, when asked for


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A completions response, and (with ``finish_reason`` null) a stream chunk."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | UnsetType | None = UNSET


class FunctionCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str


class ToolCallOut(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str = "function"
    function: FunctionCall


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class ChatChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET  # vLLM's, when asked for


class FunctionCallDelta(msgspec.Struct, frozen=True, kw_only=True):
    name: str | UnsetType = UNSET  # in a call's first delta
    arguments: str = ""


class ToolCallDeltaOut(msgspec.Struct, frozen=True, kw_only=True):
    """A streamed call: ``id``, ``type`` and the function's name first, then
    fragments of its arguments under the same ``index``."""

    index: int
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET
    function: FunctionCallDelta


class ChatDelta(msgspec.Struct, frozen=True, kw_only=True):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDeltaOut] | UnsetType = UNSET


class ChatChunkChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | UnsetType | None = UNSET


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "meshserve"
    root: str
    max_model_len: int | None = None  # vLLM's field; None until a worker reported it


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class HealthReport(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /health``: 200 when ``status == "ok"``, else 503 and what is missing."""

    status: str
    tokenizers: int
    scheduler_connected: bool
    workers: int
    missing: list[str]


# --- speech -----------------------------------------------------------------------


class VoiceRef(msgspec.Struct, frozen=True):
    id: str


class SpeechBody(msgspec.Struct, frozen=True):
    """OpenAI's speech request body (unknown fields are ignored, as OpenAI does)."""

    model: str
    input: str
    voice: str | VoiceRef
    response_format: str = DEFAULT_FORMAT  # mp3, as OpenAI
    speed: float = 1.0
    stream_format: str = "audio"
    instructions: str = ""
    # meshserve extensions
    sample_rate: int = DEFAULT_SAMPLE_RATE
    stream: bool = True

    @property
    def voice_name(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id


class SpeechAudioDelta(msgspec.Struct, frozen=True):
    type: str
    audio: str  # base64 of the audio bytes (the format's header in front of the first)


class SpeechUsage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDone(msgspec.Struct, frozen=True):
    type: str
    usage: SpeechUsage


class SpeechStreamError(msgspec.Struct, frozen=True):
    type: str
    error: ErrorDetail


class VoiceCard(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "voice"
    name: str
    language: str
    gender: str | None
    description: str


class VoiceList(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "list"
    data: list[VoiceCard]


T = TypeVar("T")

_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def decode_body(body: bytes, kind: type[T]) -> T:
    """Decode a request body; raises msgspec's DecodeError / ValidationError."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    result: T = decoder.decode(body)
    return result
