"""Prompt encoding against the reference: transformers on the same model folder.

The embedded folder is used as is, and copied with edited special-token settings
(BOS from the config flag, BOS from the post-processor, a flag overriding the
post-processor) and with richer chat templates, so each rule of the encoder is
checked where transformers decides differently.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.tokenizer.encoder import PromptEncoder, PromptError
from shared.embedded_model import ensure_embedded_model
from shared.protocol.envelope import pack_i32
from shared.protocol.generation import (
    ChatMessage,
    DetokenizeSpec,
    GenerateRequest,
    SamplingParams,
)
from shared.protocol.tools import ToolCall, ToolCalling, ToolFunction

transformers = pytest.importorskip("transformers")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "config.json")

PROMPTS = [
    "Hello, world!",
    " leading space and trailing \n",
    "def f(x):\n    return x * 2\n",
    "unicode: é ß 日本語のテキスト 😀👍🏽",
    "special tokens in text: <|im_start|>user\nhi<|im_end|>",
    "a" * 700,
]

CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2? 🤔"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 日本?"},
    ],
]


@pytest.fixture(scope="module")
def embedded_dir() -> Path:
    return ensure_embedded_model()


@pytest.fixture
def folder_copy(embedded_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """A copy of the embedded tokenizer files, edited by the test."""

    def make(
        config_edit: Callable[[dict[str, Any]], None] | None = None,
        tokenizer_edit: Callable[[dict[str, Any]], None] | None = None,
        template: str | None = None,
    ) -> Path:
        out = tmp_path / "model"
        out.mkdir()
        for name in TOKENIZER_FILES:
            shutil.copy(embedded_dir / name, out / name)
        for name, edit in (("tokenizer_config.json", config_edit),
                           ("tokenizer.json", tokenizer_edit)):
            if edit is not None:
                data = json.loads((out / name).read_text())
                edit(data)
                (out / name).write_text(json.dumps(data))
        if template is not None:
            (out / "chat_template.jinja").write_text(template)
        return out

    return make


def reference(folder: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def request(**fields: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id="r", sampling=SamplingParams(max_tokens=16), detokenize=DetokenizeSpec(),
        **fields,
    )


def test_completion_prompts_match_transformers(embedded_dir: Path) -> None:
    encoder = PromptEncoder.from_folder(embedded_dir)
    hf = reference(embedded_dir)
    for prompt in PROMPTS:
        assert encoder.encode(request(prompt=prompt)) == hf(prompt)["input_ids"], prompt


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_apply_chat_template(embedded_dir: Path, add_generation_prompt: bool) -> None:
    encoder = PromptEncoder.from_folder(embedded_dir)
    hf = reference(embedded_dir)
    for chat in CHATS:
        expected = hf.apply_chat_template(
            chat, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        messages = [ChatMessage(**m) for m in chat]
        got = encoder.encode(
            request(messages=messages, add_generation_prompt=add_generation_prompt)
        )
        assert got == expected


def test_bos_from_add_bos_token_flag(folder_copy: Callable[..., Path]) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["add_bos_token"] = True
        config["bos_token"] = "<|end_of_text|>"

    folder = folder_copy(config_edit=edit)
    encoder, hf = PromptEncoder.from_folder(folder), reference(folder)
    # transformers 5.24's TokenizersBackend applies the flag before its bos_token is
    # set at load time and silently drops it; setting it afterwards applies it the
    # documented way (a BOS post-processor), which is what the encoder follows.
    hf.add_bos_token = True
    got = encoder.encode_text("Hello")
    assert got[0] == encoder.tokenizer.token_to_id("<|end_of_text|>")
    assert got == hf("Hello")["input_ids"]
    # A chat template writes its own special tokens: no BOS is added on top.
    chat = CHATS[0]
    assert encoder.encode_chat(chat, True) == hf.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_flagged_bos_is_added_even_if_the_text_starts_with_it(
    folder_copy: Callable[..., Path],
) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["add_bos_token"] = True
        config["add_eos_token"] = True
        config["bos_token"] = "<|end_of_text|>"

    folder = folder_copy(config_edit=edit)
    encoder, hf = PromptEncoder.from_folder(folder), reference(folder)
    hf.add_bos_token = True  # see test_bos_from_add_bos_token_flag
    hf.add_eos_token = True
    for prompt in ("<|end_of_text|>Hello", "Hello<|im_end|>", "x"):
        got = encoder.encode_text(prompt)
        assert got == hf(prompt)["input_ids"], prompt
        assert got[0] == 0 and got[-1] == 2


def _bos_post_processor(tokenizer: dict[str, Any]) -> None:
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|end_of_text|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": "<|end_of_text|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {
            "<|end_of_text|>": {"id": "<|end_of_text|>", "ids": [0], "tokens": ["<|end_of_text|>"]}
        },
    }


def test_bos_from_post_processor_when_config_is_silent(folder_copy: Callable[..., Path]) -> None:
    def edit(config: dict[str, Any]) -> None:
        del config["add_bos_token"]
        config["bos_token"] = "<|end_of_text|>"

    folder = folder_copy(config_edit=edit, tokenizer_edit=_bos_post_processor)
    encoder, hf = PromptEncoder.from_folder(folder), reference(folder)
    expected = hf("Hello there")["input_ids"]
    assert expected[0] == 0  # the reference does add it: the case is real
    assert encoder.encode_text("Hello there") == expected


def test_false_flag_keeps_post_processor_bos(folder_copy: Callable[..., Path]) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["add_bos_token"] = False
        config["bos_token"] = "<|end_of_text|>"

    folder = folder_copy(config_edit=edit, tokenizer_edit=_bos_post_processor)
    encoder, hf = PromptEncoder.from_folder(folder), reference(folder)
    assert encoder.encode_text("Hello there") == hf("Hello there")["input_ids"]
    assert encoder.encode_text("Hello there")[0] == 0


TEMPLATE_WITH_FEATURES = """\
{{ bos_token }}{% for message in messages %}
{% if message['role'] not in ['user', 'assistant', 'system'] %}
{{ raise_exception('unknown role ' + message['role']) }}
{% endif %}
{% if loop.index0 > 5 %}{% break %}{% endif %}
{% set meta = {'len': message['content'] | length, 'text': message['content']} %}
<|im_start|>{{ message['role'] }} {{ meta | tojson }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_template_environment_matches_transformers(folder_copy: Callable[..., Path]) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["bos_token"] = "<|end_of_text|>"

    folder = folder_copy(config_edit=edit, template=TEMPLATE_WITH_FEATURES)
    encoder, hf = PromptEncoder.from_folder(folder), reference(folder)
    chat = [{"role": "user", "content": '  <b>"quoted" & é</b>  '}, *CHATS[1]]
    for add_generation_prompt in (True, False):
        expected_text = hf.apply_chat_template(
            chat, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert encoder.render_chat(chat, add_generation_prompt) == expected_text
        assert encoder.encode_chat(chat, add_generation_prompt) == hf.apply_chat_template(
            chat, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    assert "é" in expected_text and "<b>" in expected_text  # tojson: no ASCII/HTML escaping


def test_template_raise_exception_is_a_client_error(folder_copy: Callable[..., Path]) -> None:
    encoder = PromptEncoder.from_folder(folder_copy(template=TEMPLATE_WITH_FEATURES))
    with pytest.raises(PromptError, match="unknown role tool"):
        encoder.encode(request(messages=[ChatMessage("tool", "x")]))


def test_template_failure_is_a_client_error(folder_copy: Callable[..., Path]) -> None:
    encoder = PromptEncoder.from_folder(
        folder_copy(template="{{ messages[0]['content'] + messages[5]['content'] }}")
    )
    with pytest.raises(PromptError, match="chat template"):
        encoder.encode(request(messages=[ChatMessage("user", "x")]))


def test_template_sandbox_blocks_escapes(folder_copy: Callable[..., Path]) -> None:
    encoder = PromptEncoder.from_folder(
        folder_copy(template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    )
    with pytest.raises(PromptError, match="chat template"):
        encoder.encode(request(messages=[ChatMessage("user", "x")]))


def test_folder_without_template_refuses_chat(folder_copy: Callable[..., Path]) -> None:
    encoder = PromptEncoder.from_folder(
        folder_copy(config_edit=lambda config: config.pop("chat_template"))
    )
    assert encoder.encode(request(prompt="still fine"))
    with pytest.raises(PromptError, match="no chat template"):
        encoder.encode(request(messages=[ChatMessage("user", "x")]))


def test_prompt_token_ids_are_checked_against_the_vocabulary(embedded_dir: Path) -> None:
    encoder = PromptEncoder.from_folder(embedded_dir)
    assert encoder.encode(request(prompt_token_ids=pack_i32([1, 2, 2047]))) == [1, 2, 2047]
    with pytest.raises(PromptError, match="token id 2048 is out of vocabulary"):
        encoder.encode(request(prompt_token_ids=pack_i32([1, 2048])))
    with pytest.raises(PromptError, match="token id -1 is out of vocabulary"):
        encoder.encode(request(prompt_token_ids=pack_i32([-1])))
    with pytest.raises(PromptError, match="packed int32"):
        encoder.encode(request(prompt_token_ids=b"\x01\x00\x00"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt_token_ids": b""}, "prompt must not be empty"),
        ({"messages": []}, "messages must not be empty"),
        ({}, "exactly one of prompt, prompt_token_ids or messages must be given, got none"),
        ({"prompt": "a", "messages": [ChatMessage("user", "b")]}, "got prompt, messages"),
    ],
)
def test_bad_requests_name_the_problem(
    embedded_dir: Path, fields: dict[str, Any], message: str
) -> None:
    encoder = PromptEncoder.from_folder(embedded_dir)
    with pytest.raises(PromptError, match=message):
        encoder.encode(request(**fields))


def test_context_length_is_enforced_when_given(embedded_dir: Path) -> None:
    encoder = PromptEncoder.from_folder(embedded_dir)
    prompt_len = len(encoder.encode_text("one two three four"))
    fits = GenerateRequest(
        request_id="r", sampling=SamplingParams(max_tokens=4), detokenize=DetokenizeSpec(),
        prompt="one two three four", max_model_len=prompt_len + 4,
    )
    assert len(encoder.encode(fits)) == prompt_len
    too_long = GenerateRequest(
        request_id="r", sampling=SamplingParams(max_tokens=5), detokenize=DetokenizeSpec(),
        prompt="one two three four", max_model_len=prompt_len + 4,
    )
    with pytest.raises(PromptError, match="maximum context length"):
        encoder.encode(too_long)
    prompt_too_long = GenerateRequest(
        request_id="r", sampling=SamplingParams(max_tokens=1), detokenize=DetokenizeSpec(),
        prompt="one two three four", max_model_len=prompt_len,
    )
    with pytest.raises(PromptError, match=f"your prompt has {prompt_len} tokens"):
        encoder.encode(prompt_too_long)


# --- tools --------------------------------------------------------------------------

TEMPLATES = Path(__file__).parent.parent / "templates"
WEATHER = ToolFunction(
    name="get_weather",
    description="The weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"},
                                                 "unit": {"enum": ["c", "f"]}},
                "required": ["city"]},
)
NOOP = ToolFunction(name="noop")
TOOL_CHAT = [
    ChatMessage("system", "You call tools."),
    ChatMessage("user", "Weather in Zürich?"),
    ChatMessage("assistant", None, tool_calls=[
        ToolCall("call_1", "get_weather", '{"city": "Zürich", "unit": "c"}')]),
    ChatMessage("tool", "21 °C, sunny", tool_call_id="call_1"),
]


def _as_transformers_takes_it(message: ChatMessage) -> dict[str, Any]:
    """What a transformers user writes for the same message (arguments a dict)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": json.loads(c.arguments)}} for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
@pytest.mark.parametrize(("template", "parser"), [("qwen_tools.jinja", "hermes"),
                                                  ("llama31_tools.jinja", "llama3_json")])
def test_tools_render_as_transformers_renders_them(
    folder_copy: Callable[..., Path], template: str, parser: str, where: str
) -> None:
    source = (TEMPLATES / template).read_text()

    def edit(config: dict[str, Any]) -> None:
        config["chat_template"] = source

    folder = (folder_copy(config_edit=edit) if where == "tokenizer_config.json"
              else folder_copy(template=source))
    encoder = PromptEncoder.from_folder(folder)
    assert encoder.tool_call_parser == parser
    hf = reference(folder)
    chats = [TOOL_CHAT, TOOL_CHAT[:2]]
    for chat, tools in ((c, t) for c in chats for t in ([WEATHER, NOOP], [WEATHER], None)):
        for add_generation_prompt in (True, False):
            expected = hf.apply_chat_template(
                [_as_transformers_takes_it(m) for m in chat],
                tools=[t.template_dict() for t in tools] if tools else None,
                add_generation_prompt=add_generation_prompt, tokenize=False)
            assert encoder.render_chat(chat, add_generation_prompt, tools) == expected
            got = encoder.encode(request(messages=chat, tools=tools,
                                         add_generation_prompt=add_generation_prompt))
            assert got == hf(expected, add_special_tokens=False)["input_ids"]
    text = encoder.render_chat(TOOL_CHAT, True, [WEATHER])
    assert '"description": "The weather in a city"' in text and "Zürich" in text


def test_tool_parser_resolution(folder_copy: Callable[..., Path]) -> None:
    folder = folder_copy()
    plain = PromptEncoder.from_folder(folder)
    auto = request(messages=TOOL_CHAT[:2], tool_calling=ToolCalling("auto"))
    with pytest.raises(PromptError, match="--tool-call-parser"):
        plain.resolve_detokenize(auto)
    named = request(messages=TOOL_CHAT[:2], tool_calling=ToolCalling("function", "noop", False))
    spec = plain.resolve_detokenize(named)
    assert (spec.tool_parser, spec.tool_function, spec.tool_parallel) == ("function", "noop", False)
    assert plain.resolve_detokenize(request(prompt="x")) == DetokenizeSpec()
    mistral = PromptEncoder.from_folder(folder, tool_call_parser="mistral")
    spec = mistral.resolve_detokenize(auto)
    # [TOOL_CALLS] is a special token in Mistral tokenizers: kept, and EOS's text cut.
    assert spec.tool_parser == "mistral" and not spec.skip_special_tokens
    assert spec.stop == [mistral.special_tokens["eos_token"]]
    with pytest.raises(ValueError, match="--tool-call-parser 'pythonic'"):
        PromptEncoder.from_folder(folder, tool_call_parser="pythonic")


def test_malformed_call_arguments_in_history_are_a_client_error(
    embedded_dir: Path,
) -> None:
    encoder = PromptEncoder.from_folder(embedded_dir)
    bad = [ChatMessage("assistant", None, tool_calls=[ToolCall("c", "f", "{nope")])]
    with pytest.raises(PromptError, match="`arguments` is not JSON"):
        encoder.encode(request(messages=bad))
