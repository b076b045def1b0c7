"""How the supervisor configures the mesh (pure): settings precedence, each child's
environment, run-dir limits, and the CLI's argument parsing and status table."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from services.supervisor.cli import (
    CliError,
    build_parser,
    format_status,
    parse_restart_target,
    parse_scale_target,
)
from services.supervisor.mesh_plan import (
    START_ORDER,
    STOP_ORDER,
    Flags,
    check_run_dir,
    parse_settings,
    resolve_settings,
    socket_paths,
    transfer_socket,
)
from shared.protocol.control import (
    ChildStatus,
    MeshStatus,
    RestartRequest,
    ScaleRequest,
    ZygoteStatus,
)


def test_flags_win_over_set_which_wins_over_env() -> None:
    env = {"MESHSERVE_PORT": "7000", "MESHSERVE_MAX_NUM_SEQS": "3", "OTEL_X": "y"}
    flags = Flags(port=9000, settings=["port=8000", "max_num_seqs=8"], run_dir="/tmp/ms-t")
    settings = resolve_settings(flags, env)
    assert settings.api.port == 9000
    assert settings.api_url == "http://127.0.0.1:9000"
    configs = settings.effective_configs()
    assert configs["scheduler"].max_num_seqs == 8  # type: ignore[attr-defined]
    assert configs["api"].port == 9000  # type: ignore[attr-defined]


def test_child_env_carries_identity_addresses_and_the_caller_env() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_SERVICE_NAME": "supervisor",
        "MESHSERVE_REPLICA_FROM_HOSTNAME": "true",
        "MESHSERVE_HEALTH_FILE": "/tmp/h.json",
        "MESHSERVE_HEARTBEAT_S": "0.2",
    }
    settings = resolve_settings(Flags(run_dir="/tmp/ms-t", device="cpu"), env)
    child = settings.child_env("worker", 2)
    assert child["MESHSERVE_REPLICA"] == "2"
    assert child["MESHSERVE_HEARTBEAT_S"] == "0.2"
    assert child["MESHSERVE_DEVICE"] == "cpu"
    assert child["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
    assert "OTEL_SERVICE_NAME" not in child  # each child names itself
    # Container-only knobs must not leak into a locally supervised child.
    assert child["MESHSERVE_REPLICA_FROM_HOSTNAME"] == "false"
    assert "MESHSERVE_HEALTH_FILE" not in child
    for name in ("api", "scheduler", "kvcache", "supervisor", "speech"):
        assert child[f"MESHSERVE_{name.upper()}_ADDR"] == f"ipc:///tmp/ms-t/{name}.sock"
    # Each worker its own KV transfer socket; other services none.
    assert child["MESHSERVE_TRANSFER_ADDR"] == "ipc:///tmp/ms-t/xfer-2.sock"
    assert "MESHSERVE_TRANSFER_ADDR" not in settings.child_env("tokenizer", 0)


def test_socket_paths_include_the_worker_transfer_sockets_there(tmp_path: Path) -> None:
    # What the run dir's cleanup removes: a killed worker's transfer socket too.
    transfer_socket(tmp_path, 3).touch()
    (tmp_path / "mesh.log").touch()
    paths = socket_paths(tmp_path)
    assert tmp_path / "xfer-3.sock" in paths and tmp_path / "control.sock" in paths
    assert tmp_path / "mesh.log" not in paths


def test_with_model_pins_the_folder_and_the_served_name() -> None:
    settings = resolve_settings(Flags(run_dir="/tmp/ms-t"), {})
    assert settings.model == ""
    pinned = settings.with_model(Path("/cache/tiny"), "meshserve-tiny-llama")
    env = pinned.child_env("tokenizer", 0)
    assert env["MESHSERVE_MODEL"] == "/cache/tiny"
    assert env["MESHSERVE_SERVED_MODEL_NAME"] == "meshserve-tiny-llama"
    chosen = resolve_settings(Flags(run_dir="/tmp/ms-t", settings=["served_model_name=x"]), {})
    env = chosen.with_model(Path("/cache/tiny"), "meshserve-tiny-llama").child_env("api", 0)
    assert env["MESHSERVE_SERVED_MODEL_NAME"] == "x"


def test_model_flag_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = resolve_settings(Flags(model="weights", run_dir="/tmp/ms-t"), {})
    assert settings.model == str(tmp_path / "weights")


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("nope=1", "no service reads it"),
        ("replica=3", "the supervisor sets it"),
        ("api_addr=tcp://x:1", "the supervisor sets it"),
        ("max_num_seqs", "KEY=VALUE"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(pair: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_settings([pair])


def test_settings_accept_env_style_keys() -> None:
    assert parse_settings(["MESHSERVE_BLOCK_SIZE=32"]) == {"MESHSERVE_BLOCK_SIZE": "32"}


def test_bad_values_fail_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        resolve_settings(Flags(run_dir="/tmp/ms-t", settings=["max_num_seqs=many"]), {})
    with pytest.raises(ValueError, match="at least 1"):
        resolve_settings(Flags(run_dir="/tmp/ms-t", workers=0), {})


def test_worker_roles_reach_each_replica_and_the_last_one_repeats() -> None:
    flags = Flags(run_dir="/tmp/ms-t", workers=3, config={"worker_roles": "prefill,decode"})
    settings = resolve_settings(flags, {})
    roles = [settings.child_env("worker", i)["MESHSERVE_WORKER_ROLE"] for i in range(4)]
    assert roles == ["prefill", "decode", "decode", "decode"]  # replica 3: a scale-up
    assert "MESHSERVE_WORKER_ROLE" not in settings.child_env("tokenizer", 0)
    default = resolve_settings(Flags(run_dir="/tmp/ms-t"), {}).child_env("worker", 1)
    assert default["MESHSERVE_WORKER_ROLE"] == "both"
    with pytest.raises(ValueError, match="'dekode' is not a role"):
        resolve_settings(Flags(run_dir="/tmp/ms-t", config={"worker_roles": "prefill,dekode"}), {})
    with pytest.raises(ValueError, match="--set worker_role"):  # per replica: the list's job
        resolve_settings(Flags(run_dir="/tmp/ms-t", settings=["worker_role=decode"]), {})


def test_a_run_dir_too_long_for_ipc_is_refused() -> None:
    check_run_dir(Path("/tmp/meshserve-1000"))
    with pytest.raises(ValueError, match="shorter --run-dir"):
        check_run_dir(Path("/tmp/" + "x" * 100))


def test_stop_order_drains_the_api_first_and_frees_kv_last() -> None:
    assert set(START_ORDER) == set(STOP_ORDER)
    assert START_ORDER[:3] == ("kvcache", "scheduler", "api")
    assert STOP_ORDER[0] == "api" and STOP_ORDER[-1] == "kvcache"


def test_restart_and_scale_targets() -> None:
    assert parse_restart_target("worker") == RestartRequest("worker", None)
    assert parse_restart_target("tokenizer/2") == RestartRequest("tokenizer", 2)
    assert parse_scale_target("tokenizer=3") == ScaleRequest("tokenizer", 3)
    with pytest.raises(CliError, match="singleton"):
        parse_scale_target("api=2")
    with pytest.raises(CliError, match="scalable"):
        parse_scale_target("gpu=2")
    with pytest.raises(CliError, match="SVC=N"):
        parse_scale_target("worker=-1")
    with pytest.raises(CliError, match="SVC/REPLICA"):
        parse_restart_target("worker/x")


def test_up_flags_parse() -> None:
    args = build_parser().parse_args(
        ["up", "--model", "/m", "--port", "9", "--device", "cuda:1", "--tokenizers", "2",
         "--set", "a=1", "--set", "b=2", "--detach"]
    )
    assert (args.model, args.port, args.device, args.tokenizers) == ("/m", 9, "cuda:1", 2)
    assert args.settings == ["a=1", "b=2"] and args.detach
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--device", "tpu"])


def test_status_table_shows_every_child() -> None:
    status = MeshStatus(
        supervisor_pid=10,
        api_url="http://127.0.0.1:8000",
        model="/m",
        healthy=False,
        children=[
            ChildStatus("kvcache", 0, 11, "running", True, 0, 75.0),
            ChildStatus("worker", 1, None, "backoff", False, 3, 0.0),
        ],
    )
    text = format_status(status)
    lines = text.splitlines()
    assert "NOT healthy" in lines[0] and "http://127.0.0.1:8000" in lines[0]
    assert lines[3].split()[0] == "SERVICE"
    assert lines[4].split() == ["kvcache", "0", "11", "running", "healthy", "0", "1m15s"]
    assert lines[5].split() == ["worker", "1", "-", "backoff", "unhealthy", "3", "-"]
    assert "zygote off" in lines[1]
    ready = msgspec.structs.replace(status, zygote=ZygoteStatus(42, "ready", 1))
    assert format_status(ready).splitlines()[1] == "model /m  zygote pid 42 ready, 1 restarts"
    gone = msgspec.structs.replace(status, zygote=ZygoteStatus(None, "given-up", 3))
    assert "given up after 3 restarts" in format_status(gone).splitlines()[1]


def test_shutdown_timeout_reaches_the_supervisor_and_the_api() -> None:
    args = build_parser().parse_args(["up", "--shutdown-timeout", "90"])
    assert args.shutdown_timeout_s == 90.0  # the generated flag (config_flags.py)
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["up", "--shutdown-timeout", bad])
    env = {"MESHSERVE_SHUTDOWN_TIMEOUT_S": "10"}
    settings = resolve_settings(Flags(shutdown_timeout=90.0, run_dir="/tmp/ms-t"), env)
    assert settings.supervisor.shutdown_timeout_s == 90.0
    assert settings.effective_configs()["api"].shutdown_timeout_s == 90.0  # type: ignore[attr-defined]
    # Without the flag, the env (or --set) decides for both.
    settings = resolve_settings(Flags(run_dir="/tmp/ms-t"), env)
    assert settings.supervisor.shutdown_timeout_s == 10.0
    assert settings.effective_configs()["api"].shutdown_timeout_s == 10.0  # type: ignore[attr-defined]
