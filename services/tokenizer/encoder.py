"""Prompt encoding: a model folder's tokenizer, as transformers would apply it.

Loads ``tokenizer.json`` with the ``tokenizers`` library (transformers is the test
oracle, not the runtime) and ``tokenizer_config.json`` for the special-token
behaviour and the chat template. Pure: no I/O after loading.

A completions prompt gets the special tokens the folder asks for: whatever the
``tokenizer.json`` post-processor adds (Llama 3 adds its BOS there), plus BOS / EOS
when ``add_bos_token`` / ``add_eos_token`` is true and the post-processor did not
already add it (Llama 2 style folders). A flag set to false does not remove a token
the post-processor adds; transformers 5 keeps it too. A chat prompt is rendered by
the template, which writes every special token itself, and is encoded without
adding any again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from tokenizers import Tokenizer

from services.tokenizer.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    chat_template_option,
    find_chat_template,
)
from services.tokenizer.tool_parsers import FORCED, NEEDS_SPECIAL_TOKENS, PARSERS, detect_parser
from shared.protocol.envelope import unpack_i32
from shared.protocol.generation import (
    ChatMessage,
    DetokenizeSpec,
    GenerateRequest,
    SamplingParams,
)
from shared.protocol.tools import ToolFunction

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class PromptError(ValueError):
    """The request's prompt cannot be served; the message is for the client (HTTP 400)."""


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class PromptEncoder:
    """Turns a ``GenerateRequest``'s prompt (text, ids or chat) into prompt ids."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokenizer_config: Mapping[str, Any],
        chat_template: str | None = None,
        model_vocab_size: int | None = None,
        tool_call_parser: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(tokenizer_config.get(name))
            if content is not None:
                self.special_tokens[name] = content
        tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # A prompt id must be one the tokenizer can decode and the model can embed.
        self.vocab_size = (
            min(tokenizer_size, model_vocab_size) if model_vocab_size else tokenizer_size
        )
        # The model may sample any id of its (often padded) embedding table; ids the
        # tokenizer does not know decode to nothing, as in transformers.
        self.output_vocab_size = max(tokenizer_size, model_vocab_size or 0)
        self._bos_id = self._flagged_token_id(tokenizer_config, "add_bos_token", "bos_token")
        self._eos_id = self._flagged_token_id(tokenizer_config, "add_eos_token", "eos_token")
        self.chat_template = (
            ChatTemplate(chat_template, self.special_tokens) if chat_template else None
        )
        if tool_call_parser and tool_call_parser not in PARSERS:
            raise ValueError(f"--tool-call-parser {tool_call_parser!r}: expected one of "
                             f"{', '.join(PARSERS)}")
        # The format of `tool_choice: auto` calls: the setting, else the one the
        # template writes calls in ("" none: auto is refused).
        self.tool_call_parser = tool_call_parser or detect_parser(chat_template)

    @classmethod
    def from_folder(
        cls, model_dir: Path, chat_template: str = "", tool_call_parser: str = ""
    ) -> PromptEncoder:
        """Load a Hugging Face folder's tokenizer (``tokenizer.json`` is required).
        ``chat_template`` (a file or an inline template) replaces the folder's."""
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no tokenizer.json; meshserve needs a fast-tokenizer "
                "folder (save it with transformers' PreTrainedTokenizerFast.save_pretrained)"
            )
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_file = model_dir / "tokenizer_config.json"
        tokenizer_config: dict[str, Any] = (
            json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        )
        model_vocab_size: int | None = None
        model_config = model_dir / "config.json"
        if model_config.is_file():
            vocab = json.loads(model_config.read_text(encoding="utf-8")).get("vocab_size")
            model_vocab_size = vocab if isinstance(vocab, int) and vocab > 0 else None
        return cls(
            tokenizer,
            tokenizer_config,
            chat_template_option(chat_template) if chat_template
            else find_chat_template(model_dir, tokenizer_config),
            model_vocab_size,
            tool_call_parser,
        )

    def _flagged_token_id(self, config: Mapping[str, Any], flag: str, name: str) -> int | None:
        """The id to add for ``flag`` (add_bos_token / add_eos_token), or None when
        the flag is off or the post-processor already adds that token."""
        content = self.special_tokens.get(name)
        if not config.get(flag) or content is None:
            return None
        token_id = self.tokenizer.token_to_id(content)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json sets {flag} but {content!r} is not a token")
        # Probe once rather than check every prompt: a prompt that itself starts
        # with the BOS text must still get the BOS the folder asks for.
        with_special = self.tokenizer.encode("x", add_special_tokens=True).ids
        plain = self.tokenizer.encode("x", add_special_tokens=False).ids
        end = 0 if flag == "add_bos_token" else -1
        post_processor_adds_it = with_special[end] == token_id and plain[end] != token_id
        return None if post_processor_adds_it else token_id

    def encode_text(self, prompt: str) -> list[int]:
        """A completions prompt, with the special tokens the model adds itself."""
        if not prompt:
            raise PromptError("prompt must not be empty")
        ids = self.tokenizer.encode(prompt, add_special_tokens=True).ids
        if self._bos_id is not None:
            ids.insert(0, self._bos_id)
        if self._eos_id is not None:
            ids.append(self._eos_id)
        return self._non_empty(ids)

    def tokenize_text(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """``/tokenize`` of a completions prompt: what ``encode_text`` gives (an empty
        prompt included), or the bare ids without special tokens."""
        if add_special_tokens:
            return self.encode_text(prompt) if prompt else self._specials_only()
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def tokenize_chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        add_generation_prompt: bool,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """``/tokenize`` of chat messages: the template's text, encoded as generation
        does (no special tokens added), or with them when asked (as vLLM does)."""
        text = self.render_chat(messages, add_generation_prompt)
        if add_special_tokens:
            return self.tokenize_text(text, add_special_tokens=True)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """``/detokenize``: the text of ``ids``, special tokens kept (transformers'
        ``decode`` default). Ids outside the vocabulary are a ``PromptError``."""
        bad = next((i for i in ids if not 0 <= i < self.output_vocab_size), None)
        if bad is not None:
            raise PromptError(
                f"token id {bad} is out of vocabulary (valid ids are "
                f"0..{self.output_vocab_size - 1})"
            )
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _specials_only(self) -> list[int]:
        ids = self.tokenizer.encode("", add_special_tokens=True).ids
        if self._bos_id is not None:
            ids.insert(0, self._bos_id)
        if self._eos_id is not None:
            ids.append(self._eos_id)
        return ids

    def render_chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[ToolFunction] | None = None,
    ) -> str:
        if not messages:
            raise PromptError("messages must not be empty")
        if self.chat_template is None:
            raise PromptError(
                "this model has no chat template (none in its tokenizer_config.json or "
                "chat_template.jinja); use the completions endpoint"
            )
        plain = [template_message(m) if isinstance(m, ChatMessage) else m for m in messages]
        try:
            return self.chat_template.render(
                plain, add_generation_prompt,
                [t.template_dict() for t in tools] if tools else None)
        except ChatTemplateError as e:
            raise PromptError(str(e)) from e

    def encode_chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[ToolFunction] | None = None,
    ) -> list[int]:
        """A chat conversation through the template; the rendered text already has
        its special tokens, so none are added again."""
        text = self.render_chat(messages, add_generation_prompt, tools)
        return self._non_empty(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def check_token_ids(self, ids: Sequence[int]) -> list[int]:
        """Prompt ids given by the client: every one must be in the vocabulary."""
        if not ids:
            raise PromptError("prompt must not be empty")
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise PromptError(
                f"token id {bad} is out of vocabulary (valid ids are 0..{self.vocab_size - 1})"
            )
        return list(ids)

    def resolve_sampling(self, params: SamplingParams) -> SamplingParams:
        """``params`` with ``bad_words`` encoded (vLLM's rule: each word as given and,
        when that makes different tokens of the same count, after a space), after
        checking that ``logit_bias`` names ids of the vocabulary."""
        bad = next((t for t in params.logit_bias if not 0 <= t < self.output_vocab_size), None)
        if bad is not None:
            raise PromptError(f"logit_bias names token id {bad}, outside the vocabulary "
                              f"(valid ids are 0..{self.output_vocab_size - 1})")
        if not params.bad_words:
            return params
        words: list[list[int]] = []
        for word in params.bad_words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False).ids
            if not plain:
                raise PromptError(f"bad word {word!r} encodes to no tokens")
            words.append(plain)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False).ids
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                words.append(spaced)
        return msgspec.structs.replace(params, bad_words_token_ids=words)

    def resolve_detokenize(self, request: GenerateRequest) -> DetokenizeSpec:
        """The request's ``DetokenizeSpec`` with its tool-call parser filled in (the
        model's for ``auto``; PromptError when it has none). A parser whose marker
        is a special token decodes with special tokens kept and EOS's text cut as
        a stop string (it would show once kept)."""
        spec, calling = request.detokenize, request.tool_calling
        if calling is None:
            return spec
        if calling.mode == "auto":
            if not self.tool_call_parser:
                raise PromptError(
                    "`tool_choice` 'auto' needs a tool call parser, and this model's chat "
                    "template shows no tool-call format: start meshserve with "
                    f"--tool-call-parser ({' | '.join(PARSERS)}), or name a function or "
                    "'required' in `tool_choice`")
            parser = self.tool_call_parser
        elif calling.mode in FORCED:
            parser = calling.mode
        else:
            raise PromptError(f"unknown tool calling mode {calling.mode!r}")
        spec = msgspec.structs.replace(spec, tool_parser=parser, tool_function=calling.function,
                                       tool_parallel=calling.parallel)
        eos = self.special_tokens.get("eos_token")
        if parser in NEEDS_SPECIAL_TOKENS and spec.skip_special_tokens:
            spec = msgspec.structs.replace(spec, skip_special_tokens=False,
                                           stop=[*spec.stop, eos] if eos else spec.stop)
        return spec

    def encode(self, request: GenerateRequest) -> list[int]:
        """The prompt ids of ``request``, or ``PromptError`` naming what is wrong."""
        given = [
            name
            for name, value in (
                ("prompt", request.prompt),
                ("prompt_token_ids", request.prompt_token_ids),
                ("messages", request.messages),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise PromptError(
                "exactly one of prompt, prompt_token_ids or messages must be given, got "
                + (", ".join(given) or "none")
            )
        if request.prompt is not None:
            ids = self.encode_text(request.prompt)
        elif request.messages is not None:
            ids = self.encode_chat(request.messages, request.add_generation_prompt, request.tools)
        else:
            packed = request.prompt_token_ids or b""
            if len(packed) % 4:
                raise PromptError("prompt_token_ids must be packed int32 (length a multiple of 4)")
            ids = self.check_token_ids(unpack_i32(packed))
        self._check_length(len(ids), request.sampling.max_tokens, request.max_model_len)
        return ids

    @staticmethod
    def _non_empty(ids: list[int]) -> list[int]:
        if not ids:
            raise PromptError("prompt encodes to no tokens")
        return ids

    @staticmethod
    def _check_length(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        # vLLM's wording, which clients already parse.
        if max_model_len <= 0:
            return
        if prompt_tokens >= max_model_len:
            raise PromptError(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"your prompt has {prompt_tokens} tokens. Please reduce the length of the prompt."
            )
        if prompt_tokens + max_tokens > max_model_len:
            raise PromptError(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion."
            )


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (vLLM's shape): fields the client left out
    stay out (templates test ``'tool_calls' in message``), and each call's
    ``arguments`` is the parsed JSON, which templates ``tojson`` themselves."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.arguments)
            except ValueError as e:
                raise PromptError(f"tool call {call.id!r}: `arguments` is not JSON: {e}") from e
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.name, "arguments": arguments}})
        out["tool_calls"] = calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out
