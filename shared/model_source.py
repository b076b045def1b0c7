"""Which model folder a service loads, and the name it is served under."""

from __future__ import annotations

from pathlib import Path

from shared.embedded_model import SERVED_NAME, ensure_embedded_model


def resolve_model_dir(model: str) -> Path:
    """``model`` is a Hugging Face folder; empty means the embedded default."""
    if not model:
        return ensure_embedded_model()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder (no config.json); "
            "pass --model DIR with config.json, *.safetensors and tokenizer.json"
        )
    return path


def served_model_name(model: str, override: str = "") -> str:
    if override:
        return override
    return Path(model).name if model else SERVED_NAME
