"""`meshserve up` / `meshserve config` flags, generated from the config structs.

Every field of every config struct (``mesh_plan.CONFIG_STRUCTS``) that the
supervisor does not manage itself is a flag named after it in vLLM's spelling
(``max_num_seqs`` -> ``--max-num-seqs``, a bool -> ``--enable-prefix-caching`` /
``--no-enable-prefix-caching``) and the env var ``MESHSERVE_<FIELD>``: a flag only
sets that variable for every child, so the two cannot drift apart, and a new field
is a new flag without touching this module. A field several services read
(``max_model_len``: scheduler and worker) is one flag that sets it for all of them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from shared.config import env_name

# Flags kept under an older, shorter name as well as the generated one.
ALIASES: dict[str, list[str]] = {
    "tts_replicas": ["--tts"],
    "shutdown_timeout_s": ["--shutdown-timeout"],
}
# Flags taking several values, joined with commas into their one setting.
MULTI_VALUED = frozenset({"served_model_name"})
# Flags given once per value (`--api-key A --api-key B`), joined the same way.
REPEATABLE = frozenset({"api_key"})
HELP: dict[str, str] = {
    "model": "Hugging Face model folder or hub id ORG/NAME (default: the embedded model)",
    "api_key": "require `Authorization: Bearer KEY` on the HTTP API (repeatable: any of "
    "them is accepted); default: open",
    "served_model_name": "names clients may use as `model` (the first is the one "
    "responses carry; /v1/models lists them all)",
    "host": "api listen address",
    "port": "api listen port",
    "device": "worker device: auto | cpu | cuda[:N]",
    "dtype": "weights and activations: auto (cpu float32, cuda bfloat16) | float32 | "
    "bfloat16 | float16",
    "quantization": "fp8: projections in FP8 on the GPU's FP8 tensor cores (quantized at "
    "load, per channel; activations per token); empty: weights in dtype",
    "kv_cache_dtype": "auto (the model's dtype) | fp8: K/V stored in float8 e4m3, twice the "
    "blocks and half the bytes a decode reads",
    "max_model_len": "context length (prompt + output); 0: the model's",
    "chat_template": "a chat template file, or the template inline; replaces the model's",
    "revision": "a hub model's branch, tag or commit",
    "tool_call_parser": "format of `tool_choice: auto` calls: hermes | llama3_json | mistral "
    "(default: the one the chat template writes calls in)",
    "max_num_seqs": "running requests per worker",
    "max_num_batched_tokens": "token budget of one step",
    "enable_prefix_caching": "share the KV cache of equal prompt prefixes",
    "routing": "which worker a new request goes to: prefix (cached prefix against load) | "
    "least-loaded | round-robin",
    "routing_prefix_weight": "prefix routing: tokens of load one cached prompt token is worth",
    "routing_balance_tokens": "prefix routing: a worker this many tokens of work ahead of "
    "another (and twice its load) sends new requests least-loaded",
    "block_size": "tokens per KV block",
    "tokenizers": "tokenizer replicas",
    "workers": "worker replicas",
    "tts_replicas": "tts replicas (0: no speech)",
    "shutdown_timeout_s": "on SIGTERM / `down`, in-flight requests get this long to finish "
    "while new ones get 503",
}


@dataclass(frozen=True, slots=True)
class ConfigFlag:
    """One setting as a flag: its field, its flag names and who reads it."""

    field: str
    type: Any
    default: Any
    structs: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def names(self) -> list[str]:
        return [self.flag, *ALIASES.get(self.field, [])]


def config_flags(
    structs: dict[str, type[msgspec.Struct]], managed: frozenset[str]
) -> list[ConfigFlag]:
    """One flag per setting name, in the order the structs list them."""
    by_field: dict[str, ConfigFlag] = {}
    for struct_name, cls in structs.items():
        instance = cls()
        for info in msgspec.structs.fields(cls):
            name = info.encode_name
            if name in managed:
                continue
            known = by_field.get(name)
            if known is None:
                by_field[name] = ConfigFlag(name, info.type, getattr(instance, info.name),
                                            (struct_name,))
            else:
                by_field[name] = ConfigFlag(name, known.type, known.default,
                                            (*known.structs, struct_name))
    return list(by_field.values())


def add_config_flags(
    parser: argparse.ArgumentParser,
    flags: list[ConfigFlag],
    types: dict[str, Callable[[str], Any]] | None = None,
) -> None:
    """Add every flag to ``parser`` (dest: the field name, default None: unset).
    ``types`` gives a field a stricter parser than its type's."""
    group = parser.add_argument_group(
        "settings", "every service setting; each flag sets MESHSERVE_<NAME> for the mesh"
    )
    for flag in flags:
        default = msgspec.json.encode(flag.default).decode()
        help_text = (f"{HELP[flag.field]}; " if flag.field in HELP else "") + (
            f"{env_name(flag.field)}, default {default} ({', '.join(flag.structs)})"
        )
        kwargs: dict[str, Any] = {"dest": flag.field, "default": None, "help": help_text}
        if flag.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif flag.field in MULTI_VALUED:
            kwargs |= {"nargs": "+", "metavar": "NAME"}
        elif flag.field in REPEATABLE:
            kwargs |= {"action": "append", "metavar": "KEY"}
        else:
            kwargs["type"] = (types or {}).get(flag.field, flag.type)
            kwargs["metavar"] = flag.field.upper()
        group.add_argument(*flag.names, **kwargs)


def flag_values(args: argparse.Namespace, flags: list[ConfigFlag]) -> dict[str, str]:
    """field -> the value given on the command line, as its env var spells it."""
    values: dict[str, str] = {}
    for flag in flags:
        value = getattr(args, flag.field, None)
        if value is None:
            continue
        if isinstance(value, bool):
            values[flag.field] = "true" if value else "false"
        elif isinstance(value, list):
            values[flag.field] = ",".join(str(v) for v in value)
        else:
            values[flag.field] = str(value)
    return values
