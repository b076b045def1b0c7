"""Which model folder a service loads, and the names it is served under.

``--model`` takes a Hugging Face folder or a hub id (``org/name``), as vLLM does. A
hub id resolves through ``huggingface_hub``'s cache (``HF_HOME`` /
``HF_HUB_CACHE``; ``--revision`` picks a branch, tag or commit): a snapshot already
in the cache is used without any network access, and with ``HF_HUB_OFFLINE=1`` a
missing one is an error naming the fix. Only a model that is not cached yet, and
only when the hub is not offline, is downloaded, once, at start (the supervisor
resolves it before any child starts, and hands the children the folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from shared.embedded_model import SERVED_NAME, ensure_embedded_model

# What a hub id looks like: ``org/name`` (the hub's own rule for both parts).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files a served model needs; a download skips the rest (other formats, images).
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]


def is_hub_id(model: str) -> bool:
    """``org/name`` that is not a folder here (a folder of that name wins)."""
    return bool(HUB_ID.match(model)) and not Path(model).expanduser().exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_model(repo_id: str, revision: str = "") -> Path:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default: main)."""
    # Imported here: only hub ids need it, and it reads HF_* env vars at import.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    rev = revision or None
    try:
        return Path(snapshot_download(repo_id, revision=rev, local_files_only=True))
    except LocalEntryNotFoundError as e:
        if _offline():
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache"
            raise FileNotFoundError(
                f"{repo_id}{'@' + revision if revision else ''} is not in the Hugging Face "
                f"cache ({cache}) and HF_HUB_OFFLINE is set; download it first "
                f"(`hf download {repo_id}`) or pass --model DIR"
            ) from e
    return Path(snapshot_download(repo_id, revision=rev, allow_patterns=MODEL_FILES))


def resolve_model_dir(model: str, revision: str = "") -> Path:
    """``model`` is a Hugging Face folder or hub id; empty means the embedded default."""
    if not model:
        return ensure_embedded_model()
    path = Path(model).expanduser()
    if is_hub_id(model):
        path = resolve_hub_model(model, revision)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder (no config.json); "
            "pass --model DIR with config.json, *.safetensors and tokenizer.json, "
            "or a hub id ORG/NAME"
        )
    return path


def served_model_names(model: str, override: str = "") -> list[str]:
    """The names clients may ask for: ``--served-model-name`` (comma-separated
    aliases, the first is the main one), else the hub id or the folder's name."""
    names = [name.strip() for name in override.split(",") if name.strip()]
    if names:
        return names
    if not model:
        return [SERVED_NAME]
    return [model if is_hub_id(model) else Path(model).name]


def served_model_name(model: str, override: str = "") -> str:
    """The main served name: what responses carry unless a request names an alias."""
    return served_model_names(model, override)[0]
