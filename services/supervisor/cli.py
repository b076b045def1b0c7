"""The `meshserve` command line.

    meshserve up [--model DIR|ORG/NAME] [--host H] [--port P] [--device D]
                 [--tokenizers N] [--workers N] [--tts N] [--shutdown-timeout S]
                 [--<any setting> V ...] [--set KEY=VALUE ...] [--run-dir DIR] [--detach]
    meshserve status [--json]        every child: service, replica, pid, state, health
    meshserve restart SVC[/REPLICA]  SIGTERM, wait, start again, wait until healthy
    meshserve scale SVC=N            tokenizer | worker | tts
    meshserve down                   stop the mesh of the run dir, wait until it is gone
    meshserve config [--json]        effective settings of every service
    meshserve keys [--dir D] [--force]  create the mesh's CURVE keys (`up` makes them too)
    meshserve kv stats|dump ID       KV cache figures (services/supervisor/kv_cli.py)
    meshserve trace ID [--jaeger URL]  a request's span tree (services/supervisor/trace_cli.py)
    meshserve deploy k8s [--out DIR | --overlay cpu|gpu]  Kubernetes manifests (deploy_cli.py)
    meshserve --version

Every command finds its mesh through the run dir (``--run-dir``,
``MESHSERVE_RUN_DIR``, default ``/tmp/meshserve-<uid>``). Exit codes: 0 done,
1 failed (the reason on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import msgspec

from services.supervisor import deploy_cli, kv_cli, trace_cli
from services.supervisor.config import SupervisorConfig
from services.supervisor.config_flags import (
    ConfigFlag,
    add_config_flags,
    config_flags,
    flag_values,
)
from services.supervisor.control import ControlClient, ControlTimeout
from services.supervisor.mesh_plan import (
    CONFIG_STRUCTS,
    MANAGED_SETTINGS,
    SCALABLE,
    SINGLETONS,
    Flags,
    MeshSettings,
    api_key_setting,
    curve_dir,
    default_run_dir,
    resolve_settings,
)
from services.supervisor.run_dir import (
    kill_and_wait,
    pid_file,
    remove_leftovers,
    running_pid,
    wait_for_exit,
)
from shared.config import env_name, load_config
from shared.curve import CurveKeyError, create_keys
from shared.protocol.control import (
    ControlReply,
    MeshStatus,
    RestartRequest,
    ScaleRequest,
    ShutdownRequest,
    StatusRequest,
    ZygoteStatus,
)

STATUS_TIMEOUT_S = 10.0
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class CliError(Exception):
    """A failure to report on stderr with exit code 1."""


def _version() -> str:
    try:
        return version("meshserve")
    except PackageNotFoundError:
        return "unknown"


def _device(value: str) -> str:
    if not DEVICE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r}: expected auto, cpu, cuda or cuda:N")
    return value


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: expected a non-negative integer")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value!r}: expected a non-negative number of seconds")
    return seconds


def _add_run_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        help="sockets, pid file and detached log (default: $MESHSERVE_RUN_DIR or "
        "/tmp/meshserve-<uid>)",
    )


def _mesh_flags() -> list[ConfigFlag]:
    return config_flags(CONFIG_STRUCTS, MANAGED_SETTINGS)


def _add_mesh_flags(parser: argparse.ArgumentParser) -> None:
    # Every setting of every service, generated from the config structs
    # (config_flags.py): `--max-num-seqs 8` is MESHSERVE_MAX_NUM_SEQS=8.
    add_config_flags(parser, _mesh_flags(), types={
        "device": _device, "tokenizers": _count, "workers": _count, "tts_replicas": _count,
        "shutdown_timeout_s": _seconds,
    })
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any service setting, passed to the children as MESHSERVE_<KEY> "
        "(see `meshserve config`); repeatable",
    )
    _add_run_dir(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshserve",
        description="Serve language models and speech behind an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"meshserve {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start the mesh (foreground until Ctrl-C)")
    _add_mesh_flags(up)
    up.add_argument("--detach", action="store_true", help="return once the mesh is healthy")
    # Internal: the detaching CLI's pipe, written once with "ready URL" / "failed WHY".
    up.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    status = commands.add_parser("status", help="show every child of the running mesh")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add_run_dir(status)

    restart = commands.add_parser("restart", help="restart a service or one replica")
    restart.add_argument("target", metavar="SVC[/REPLICA]")
    restart.add_argument("--timeout", type=float, help="seconds to wait for health")
    _add_run_dir(restart)

    scale = commands.add_parser("scale", help="set the replica count of a service")
    scale.add_argument("target", metavar="SVC=N")
    scale.add_argument("--timeout", type=float, help="seconds to wait for health")
    _add_run_dir(scale)

    down = commands.add_parser("down", help="stop the mesh and wait until it is gone")
    down.add_argument("--timeout", type=float,
                      help="seconds to wait (default: the shutdown timeout + 30)")
    _add_run_dir(down)

    config = commands.add_parser("config", help="print every service's effective settings")
    _add_mesh_flags(config)
    config.add_argument("--json", action="store_true", help="machine-readable output")
    keys = commands.add_parser("keys", help="create the mesh's CURVE keys")
    keys.add_argument("--dir", help="key dir (default: $MESHSERVE_CURVE_DIR or <run dir>/keys)")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    _add_run_dir(keys)
    kv_cli.add_parser(commands, _add_run_dir)
    trace_cli.add_parser(commands)
    deploy_cli.add_parser(commands)
    return parser


def _flags(args: argparse.Namespace) -> Flags:
    values = flag_values(args, _mesh_flags())
    values.pop("model", None)  # resolved by resolve_settings (a folder or a hub id)
    if args.api_key:
        values["api_key"] = api_key_setting(args.api_key)  # refuses a key with a comma
    return Flags(model=args.model, run_dir=args.run_dir, settings=list(args.settings),
                 config=values)


def _settings(args: argparse.Namespace) -> MeshSettings:
    try:
        return resolve_settings(_flags(args), os.environ)
    except ValueError as e:
        raise CliError(str(e)) from e


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir).expanduser().absolute()
    try:
        configured = load_config(SupervisorConfig).run_dir
    except ValueError as e:
        raise CliError(str(e)) from e
    return Path(configured).expanduser().absolute() if configured else default_run_dir()


def _timeout(args: argparse.Namespace) -> float:
    if args.timeout is not None:
        return float(args.timeout)
    # The supervisor answers once the new processes are healthy, which takes as
    # long as a start; give it the startup deadline and a little more.
    return load_config(SupervisorConfig).startup_timeout_s + 30.0


def _client(run_dir: Path) -> ControlClient:
    if running_pid(run_dir) is None:
        raise CliError(f"no mesh is running in {run_dir}")
    try:
        return ControlClient(run_dir)
    except CurveKeyError as e:
        raise CliError(str(e)) from e


def _ask(run_dir: Path, body: object, timeout_s: float) -> MeshStatus | ControlReply:
    try:
        return _client(run_dir).request(body, timeout_s)  # type: ignore[arg-type]
    except ControlTimeout as e:
        raise CliError(str(e)) from e


def _expect_reply(answer: MeshStatus | ControlReply) -> str:
    if not isinstance(answer, ControlReply):
        raise CliError(f"unexpected answer from the supervisor: {type(answer).__name__}")
    if not answer.ok:
        raise CliError(answer.message)
    return answer.message


# --------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace, argv: list[str]) -> int:
    # Imported here: it pulls in torch (the embedded model), which status/down skip.
    from services.supervisor.launcher import run_detached, run_foreground

    settings = _settings(args)
    if args.detach:
        up_args = [a for a in argv[argv.index("up") + 1 :] if a != "--detach"]
        if args.api_key:
            # The background supervisor gets the keys through its environment, not
            # its argv, which every local user can read in `ps`.
            up_args = _without_api_keys(up_args)
            os.environ[env_name("api_key")] = api_key_setting(args.api_key)
        return run_detached(settings, up_args)
    return run_foreground(settings, ready_fd=args.ready_fd)


def _without_api_keys(args: list[str]) -> list[str]:
    kept: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg == "--api-key":
            skip_value = True
        elif not arg.startswith("--api-key="):
            kept.append(arg)
    return kept


def cmd_keys(args: argparse.Namespace) -> int:
    key_dir = (Path(args.dir).expanduser().absolute() if args.dir
               else curve_dir(_run_dir(args), os.environ))
    try:
        create_keys(key_dir, overwrite=args.force)
    except (CurveKeyError, OSError) as e:
        raise CliError(str(e)) from e
    print(f"mesh keys written to {key_dir} (server.key_secret, client.key_secret; mode 0600)")
    return 0


def format_status(status: MeshStatus) -> str:
    header = (
        f"mesh {'healthy' if status.healthy else 'NOT healthy'}  api {status.api_url}  "
        f"supervisor pid {status.supervisor_pid}\nmodel {status.model}  {_zygote(status.zygote)}"
    )
    rows = [("SERVICE", "REPLICA", "PID", "STATE", "HEALTH", "RESTARTS", "UPTIME")]
    for child in status.children:
        rows.append(
            (
                child.service,
                str(child.replica),
                str(child.pid) if child.pid is not None else "-",
                child.state,
                "healthy" if child.healthy else "unhealthy",
                str(child.restarts),
                _duration(child.uptime_s) if child.pid is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join([header, "", *lines])


def _zygote(zygote: ZygoteStatus | None) -> str:
    if zygote is None:
        return "zygote off (children start by plain spawn)"
    if zygote.state == "given-up":
        return f"zygote given up after {zygote.restarts} restarts (children start by plain spawn)"
    pid = f"pid {zygote.pid} " if zygote.pid is not None else ""
    return f"zygote {pid}{zygote.state}, {zygote.restarts} restarts"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.1f}s"


def cmd_status(args: argparse.Namespace) -> int:
    answer = _ask(_run_dir(args), StatusRequest(), STATUS_TIMEOUT_S)
    if not isinstance(answer, MeshStatus):
        raise CliError(_expect_reply(answer))
    if args.json:
        print(msgspec.json.encode(answer).decode())
    else:
        print(format_status(answer))
    return 0


def parse_restart_target(target: str) -> RestartRequest:
    service, _, replica = target.partition("/")
    if not service or (replica and not replica.isdigit()):
        raise CliError(f"restart expects SVC or SVC/REPLICA, got {target!r}")
    return RestartRequest(service=service, replica=int(replica) if replica else None)


def parse_scale_target(target: str) -> ScaleRequest:
    service, sep, count = target.partition("=")
    if not sep or not count.isdigit():
        raise CliError(f"scale expects SVC=N, got {target!r}")
    if service in SINGLETONS:
        raise CliError(f"{service} is a singleton and cannot be scaled")
    if service not in SCALABLE:
        raise CliError(f"cannot scale {service!r}; scalable: {', '.join(sorted(SCALABLE))}")
    return ScaleRequest(service=service, replicas=int(count))


def cmd_restart(args: argparse.Namespace) -> int:
    request = parse_restart_target(args.target)
    print(_expect_reply(_ask(_run_dir(args), request, _timeout(args))))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    request = parse_scale_target(args.target)
    print(_expect_reply(_ask(_run_dir(args), request, _timeout(args))))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    pid = running_pid(run_dir)
    if pid is None:
        print(f"no mesh is running in {run_dir}")
        return 0
    try:
        _expect_reply(ControlClient(run_dir).request(ShutdownRequest(), STATUS_TIMEOUT_S))
    except (ControlTimeout, CliError, CurveKeyError) as e:
        # A wedged control loop must not make the mesh unstoppable: fall back to
        # the signal, which the supervisor handles the same way.
        print(f"meshserve: {e}; sending SIGTERM to {pid}", file=sys.stderr)
        os.kill(pid, signal.SIGTERM)
    # The api drains first (shutdown_timeout_s), then every child stops in turn.
    timeout_s = args.timeout
    if timeout_s is None:
        timeout_s = load_config(SupervisorConfig).shutdown_timeout_s + 30.0
    if not wait_for_exit(pid, timeout_s):
        gone = kill_and_wait(pid, 5.0)
        _remove_leftovers(run_dir)
        raise CliError(
            f"the supervisor (pid {pid}) did not stop within {timeout_s:g} s; "
            + ("killed it" if gone else "could not kill it")
        )
    # A clean supervisor removed these itself; one that was killed could not.
    _remove_leftovers(run_dir)
    print(f"mesh in {run_dir} stopped")
    return 0


def _remove_leftovers(run_dir: Path) -> None:
    """Only once no supervisor owns the run dir any more."""
    if running_pid(run_dir) is not None:
        return
    remove_leftovers(run_dir)
    pid_file(run_dir).unlink(missing_ok=True)


def _without_secrets(config: msgspec.Struct) -> msgspec.Struct:
    """``config`` with the API keys masked: `config` output gets pasted into issues."""
    if getattr(config, "api_key", ""):
        return msgspec.structs.replace(config, api_key="<set, not shown>")
    return config


def cmd_config(args: argparse.Namespace) -> int:
    # Imported here: the embedded model's module pulls in torch.
    from shared.embedded_model import SERVED_NAME, embedded_model_dir

    settings = _settings(args)
    if not settings.model:
        # Show where the embedded model lives without generating it.
        settings = settings.with_model(embedded_model_dir(), SERVED_NAME)
    configs = {name: _without_secrets(c) for name, c in settings.effective_configs().items()}
    if args.json:
        print(msgspec.json.encode({name: c for name, c in configs.items()}).decode())
        return 0
    for name, config in configs.items():
        print(f"[{name}]  # {type(config).__name__}")
        for field in msgspec.structs.fields(config):
            value = msgspec.json.encode(getattr(config, field.name)).decode()
            print(f"{field.encode_name} = {value}  # {env_name(field.encode_name)}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        match args.command:
            case "up":
                return cmd_up(args, argv)
            case "status":
                return cmd_status(args)
            case "restart":
                return cmd_restart(args)
            case "scale":
                return cmd_scale(args)
            case "down":
                return cmd_down(args)
            case "config":
                return cmd_config(args)
            case "keys":
                return cmd_keys(args)
            case "kv":
                run_dir = _run_dir(args)
                if running_pid(run_dir) is None:
                    raise CliError(f"no mesh is running in {run_dir}")
                return kv_cli.main(args, run_dir)
            case "trace":
                return trace_cli.cmd_trace(args)
            case "deploy":
                return deploy_cli.main(args)
    except (CliError, deploy_cli.DeployError) as e:
        print(f"meshserve: {e}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
