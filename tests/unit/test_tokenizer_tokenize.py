"""``PromptEncoder``'s /tokenize and /detokenize answers against transformers'
tokenizer, and ``--chat-template`` (a file or inline) replacing the folder's."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.tokenizer.chat_template import chat_template_option
from services.tokenizer.encoder import PromptEncoder, PromptError
from shared.embedded_model import ensure_embedded_model

MESSAGES = [{"role": "user", "content": "Hi there"}]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def test_tokenize_and_detokenize_equal_transformers() -> None:
    folder = ensure_embedded_model()
    encoder = PromptEncoder.from_folder(folder)
    hf = AutoTokenizer.from_pretrained(folder)
    for prompt in ("Hello, mesh!", "", " ✓ unicode"):
        assert encoder.tokenize_text(prompt) == hf(prompt).input_ids
        bare = hf(prompt, add_special_tokens=False).input_ids
        assert encoder.tokenize_text(prompt, False) == bare
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert encoder.tokenize_chat(MESSAGES, True) == hf(text, add_special_tokens=False).input_ids
    assert encoder.tokenize_chat(MESSAGES, True, True) == hf(text).input_ids
    ids = hf("Hello, mesh!").input_ids
    assert encoder.detokenize(ids) == hf.decode(ids)
    with pytest.raises(PromptError, match="out of vocabulary"):
        encoder.detokenize([encoder.output_vocab_size])


def test_chat_template_from_a_file_or_inline(tmp_path: Path) -> None:
    folder = ensure_embedded_model()
    file = tmp_path / "template.jinja"
    file.write_text(TEMPLATE)
    assert chat_template_option(str(file)) == TEMPLATE
    assert chat_template_option(TEMPLATE) == TEMPLATE
    with pytest.raises(FileNotFoundError, match="no such file"):
        chat_template_option(str(tmp_path / "missing.jinja"))
    for option in (str(file), TEMPLATE):
        encoder = PromptEncoder.from_folder(folder, option)
        assert encoder.render_chat(MESSAGES, True) == "<user>Hi there\n"
