from __future__ import annotations

import msgspec


class TokenizerConfig(msgspec.Struct, frozen=True):
    """tokenizer settings (env MESHSERVE_<FIELD>)."""

    model: str = ""  # Hugging Face folder; empty: the embedded default
    max_inflight: int = 4096  # requests this replica detokenizes at once
    # Replaces the model's chat template: a file, or the template inline (vLLM's
    # --chat-template). Empty: the model folder's.
    chat_template: str = ""
    revision: str = ""  # a hub model's branch, tag or commit (--model ORG/NAME); empty: main
    # How `tool_choice: auto` calls are parsed (vLLM's --tool-call-parser): hermes,
    # llama3_json or mistral. Empty: the format the chat template writes calls in.
    tool_call_parser: str = ""
