"""Every config field is a `meshserve up` flag and a MESHSERVE_* variable, and
`meshserve config` prints it: the flags are generated from the structs
(services/supervisor/config_flags.py), so this checks every field there is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, get_args, get_origin

import msgspec
import pytest

from services.supervisor.cli import _flags, build_parser
from services.supervisor.config_flags import ALIASES, config_flags
from services.supervisor.mesh_plan import CONFIG_STRUCTS, MANAGED_SETTINGS, resolve_settings
from shared.config import env_name

# Strings some structs validate; any other string field takes "probe-<name>".
VALID_STRINGS = {"device": "cpu", "dtype": "float32", "preemption_mode": "recompute",
                 "routing": "round-robin", "worker_roles": "prefill,decode",
                 "log_level": "debug", "host": "127.0.0.2", "engine": "espeak-ng",
                 "curve_dir": "/tmp/ms-flags-keys", "api_key": "probe-key"}


def _probe(name: str, kind: object, default: object) -> tuple[list[str], object]:
    """Command-line words that set ``name`` to something other than its default,
    and the value the config struct must then hold."""
    flag = "--" + name.replace("_", "-")
    if get_origin(kind) is Annotated:  # a bounded field: its default + 3 stays in bounds
        kind = get_args(kind)[0]
    if kind is bool:
        return ([f"--no-{flag[2:]}"] if default else [flag]), not default
    if kind is int:
        return [flag, str(int(default) + 3)], int(default) + 3  # type: ignore[call-overload]
    if kind is float:
        return [flag, str(float(default) + 1.5)], float(default) + 1.5  # type: ignore[arg-type]
    if name == "served_model_name":
        return [flag, "main-name", "alias-1"], "main-name,alias-1"
    if name == "model":
        return [flag, "/models/probe"], "/models/probe"
    value = VALID_STRINGS.get(name, f"probe-{name}")
    return [flag, value], value


def _every_field() -> list[tuple[str, str, object, object]]:
    fields = []
    for struct_name, cls in CONFIG_STRUCTS.items():
        instance = cls()
        for info in msgspec.structs.fields(cls):
            if info.encode_name not in MANAGED_SETTINGS:
                fields.append((struct_name, info.encode_name, info.type,
                               getattr(instance, info.name)))
    return fields


def test_flags_cover_every_field_once() -> None:
    flags = config_flags(CONFIG_STRUCTS, MANAGED_SETTINGS)
    assert {f.field for f in flags} == {name for _, name, _, _ in _every_field()}
    assert len({f.flag for f in flags}) == len(flags)
    # vLLM's spellings are among them.
    names = {n for f in flags for n in f.names}
    for vllm in ("--served-model-name", "--max-model-len", "--dtype", "--chat-template",
                 "--max-num-seqs", "--max-num-batched-tokens", "--enable-prefix-caching",
                 "--block-size", "--revision", "--tts", "--shutdown-timeout"):
        assert vllm in names or vllm.removeprefix("--").replace("-", "_") in ALIASES, vllm


@pytest.mark.parametrize(("struct", "name", "kind", "default"), _every_field(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_each_flag_reaches_its_struct(struct: str, name: str, kind: object,
                                      default: object) -> None:
    words, expected = _probe(name, kind, default)
    args = build_parser().parse_args(["config", "--run-dir", "/tmp/ms-flags", *words])

    settings = resolve_settings(_flags(args), {})
    value = getattr(settings.effective_configs()[struct], name)
    if name == "model":
        value = str(value)
    assert value == expected
    # The flag is nothing but the env var: the same value through MESHSERVE_<NAME>.
    env = {env_name(name): settings.child_overrides[env_name(name)]}
    from_env = resolve_settings(_flags(build_parser().parse_args(
        ["config", "--run-dir", "/tmp/ms-flags"])), env)
    assert getattr(from_env.effective_configs()[struct], name) == value


def test_meshserve_config_prints_every_field_and_its_env_var(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "services.supervisor.cli", "config", "--run-dir",
         str(tmp_path), "--max-num-seqs", "7", "--no-enable-prefix-caching",
         "--served-model-name", "a", "b"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    for _, name, _, _ in _every_field():
        assert f"# {env_name(name)}" in run.stdout, name
    assert "max_num_seqs = 7  # MESHSERVE_MAX_NUM_SEQS" in run.stdout
    assert "enable_prefix_caching = false" in run.stdout
    assert 'served_model_name = "a,b"' in run.stdout
    as_json = json.loads(subprocess.run(
        [sys.executable, "-m", "services.supervisor.cli", "config", "--json", "--run-dir",
         str(tmp_path), "--max-model-len", "512"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout)
    assert as_json["scheduler"]["max_model_len"] == 512
    assert as_json["worker"]["max_model_len"] == 512


def test_bad_flag_values_are_usage_errors() -> None:
    for words in (["--max-num-seqs", "many"], ["--device", "tpu"], ["--tts", "-1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["up", *words])
