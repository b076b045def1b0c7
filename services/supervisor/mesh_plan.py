"""What the mesh is made of and how each child is configured; pure, no I/O.

The supervisor hands out every address (ipc sockets in the run dir) and every
setting as ``MESHSERVE_*`` env vars; a child never guesses one. Settings resolve
in this order, last wins: the caller's environment, ``--set KEY=VALUE``, then the
named flags (``--model``, ``--port``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec

from services.api.config import ApiConfig
from services.kvcache.config import KvCacheConfig
from services.scheduler.config import SchedulerConfig
from services.supervisor.config import SupervisorConfig
from services.tokenizer.config import TokenizerConfig
from services.tts.config import TtsConfig
from services.worker.config import WorkerConfig
from shared.config import PREFIX, MeshAddresses, ProcessConfig, env_name, load_config
from shared.model_source import is_hub_id

# Singletons bind and must be up before the replicas that connect to them are
# useful (ZMQ reconnects, so this is about orderly logs, not correctness).
START_ORDER = ("kvcache", "scheduler", "api", "tokenizer", "worker", "tts")
# The api goes first so it stops taking requests and drains; the KV manager goes
# last because the scheduler frees into it until the end.
STOP_ORDER = ("api", "tokenizer", "tts", "scheduler", "worker", "kvcache")
# The service that drains on SIGTERM (up to shutdown_timeout_s) before the rest stop.
DRAINS_FIRST = "api"
SINGLETONS = frozenset({"kvcache", "scheduler", "api"})
SCALABLE = frozenset({"tokenizer", "worker", "tts"})
# A text mesh cannot serve without one of these; tts may scale to zero.
AT_LEAST_ONE = frozenset({"tokenizer", "worker"})

SOCKET_NAMES = {
    "api_addr": "api.sock",
    "scheduler_addr": "scheduler.sock",
    "kvcache_addr": "kvcache.sock",
    "supervisor_addr": "supervisor.sock",
    "speech_addr": "speech.sock",
}
CONTROL_SOCKET = "control.sock"
TRANSFER_SOCKETS = "xfer-{replica}.sock"  # each worker's KV transfer socket
KEY_DIR = "keys"  # the mesh's CURVE keys, unless MESHSERVE_CURVE_DIR names another dir
PID_FILE = "supervisor.pid"
DETACHED_LOG = "mesh.log"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107

# Every config struct a mesh process reads, by the name `meshserve config` shows.
CONFIG_STRUCTS: dict[str, type[msgspec.Struct]] = {
    "process": ProcessConfig,
    "addresses": MeshAddresses,
    "supervisor": SupervisorConfig,
    "api": ApiConfig,
    "tokenizer": TokenizerConfig,
    "scheduler": SchedulerConfig,
    "kvcache": KvCacheConfig,
    "worker": WorkerConfig,
    "tts": TtsConfig,
}
# Set by the supervisor per child or from the run dir; `--set` must not fight it.
# (``replica_from_hostname`` and ``health_file`` are for containers, where every
# replica shares one environment; here each child gets its replica id directly.)
MANAGED_SETTINGS = frozenset(
    {"replica", "replica_from_hostname", "health_file", "run_dir", "transfer_addr",
     "worker_role", *SOCKET_NAMES}
)


def default_run_dir() -> Path:
    return Path(f"/tmp/meshserve-{os.getuid()}")


def mesh_addresses(run_dir: Path) -> MeshAddresses:
    return MeshAddresses(**{key: f"ipc://{run_dir / name}" for key, name in SOCKET_NAMES.items()})


def curve_dir(run_dir: Path, environ: Mapping[str, str]) -> Path:
    """Where the mesh of ``run_dir`` keeps its CURVE keys: ``MESHSERVE_CURVE_DIR``
    or ``<run dir>/keys``. The supervisor and the CLI both ask this."""
    configured = environ.get(env_name("curve_dir"), "")
    return Path(configured).expanduser().absolute() if configured else run_dir / KEY_DIR


def transfer_socket(run_dir: Path, replica: int) -> Path:
    return run_dir / TRANSFER_SOCKETS.format(replica=replica)


def socket_paths(run_dir: Path) -> list[Path]:
    """Every socket file a mesh in ``run_dir`` binds: the fixed ones, and the worker
    transfer sockets there now (one per worker replica that ran; a killed worker's
    stays behind until the run dir is cleaned)."""
    fixed = [run_dir / name for name in (*SOCKET_NAMES.values(), CONTROL_SOCKET)]
    return fixed + sorted(run_dir.glob(TRANSFER_SOCKETS.format(replica="*")))


def check_run_dir(run_dir: Path) -> None:
    """Raise ValueError when the run dir's socket paths would not fit sun_path."""
    longest = max(len(str(path)) for path in socket_paths(run_dir))
    if longest > MAX_IPC_PATH:
        raise ValueError(
            f"run dir {run_dir} is too long for ipc sockets ({longest} > {MAX_IPC_PATH} "
            "bytes); pass a shorter --run-dir such as /tmp/ms"
        )


def known_settings() -> dict[str, list[str]]:
    """Setting name -> the config structs that read it."""
    known: dict[str, list[str]] = {}
    for struct_name, cls in CONFIG_STRUCTS.items():
        for f in msgspec.structs.fields(cls):
            if f.encode_name not in MANAGED_SETTINGS:
                known.setdefault(f.encode_name, []).append(struct_name)
    return known


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """``["max_num_seqs=8", ...]`` -> ``{"MESHSERVE_MAX_NUM_SEQS": "8"}``.

    Keys are checked against every config struct, so a typo fails at once instead
    of being silently ignored by every child.
    """
    known = known_settings()
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lower().removeprefix(PREFIX.lower())
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        if key in MANAGED_SETTINGS:
            raise ValueError(f"--set {key}: the supervisor sets it (use --run-dir for paths)")
        if key not in known:
            raise ValueError(
                f"--set {key}: no service reads it; known settings: {', '.join(sorted(known))}"
            )
        out[env_name(key)] = value
    return out


@dataclass(frozen=True, slots=True)
class Flags:
    """The `meshserve up` / `meshserve config` flags that shape the mesh."""

    model: str | None = None
    host: str | None = None
    port: int | None = None
    device: str | None = None
    tokenizers: int | None = None
    workers: int | None = None
    tts: int | None = None
    run_dir: str | None = None
    shutdown_timeout: float | None = None
    settings: list[str] = field(default_factory=list)
    # Generated flags (config_flags.py): setting name -> value as its env var
    # spells it. The named fields above win over these.
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """Everything the supervisor needs, resolved once from flags and env."""

    run_dir: Path
    supervisor: SupervisorConfig
    process: ProcessConfig
    addresses: MeshAddresses
    api: ApiConfig
    # MESHSERVE_* vars every child gets on top of the caller's environment.
    child_overrides: dict[str, str]
    environ: dict[str, str]

    @property
    def model(self) -> str:
        return self.child_overrides.get(env_name("model"), self.environ.get(env_name("model"), ""))

    @property
    def api_url(self) -> str:
        host = self.api.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.api.port}"

    def replicas(self) -> dict[str, int]:
        """How many replicas of each service the mesh starts with."""
        return {
            "kvcache": 1,
            "scheduler": 1,
            "api": 1,
            "tokenizer": self.supervisor.tokenizers,
            "worker": self.supervisor.workers,
            "tts": self.supervisor.tts_replicas,
        }

    def child_env(self, service: str, replica: int) -> dict[str, str]:
        """The whole environment of one child process."""
        env = dict(self.environ)
        env.update(self.child_overrides)
        env[env_name("replica")] = str(replica)
        env[env_name("replica_from_hostname")] = "false"
        env.pop(env_name("health_file"), None)
        env[env_name("heartbeat_s")] = str(self.process.heartbeat_s)
        for key in SOCKET_NAMES:
            env[env_name(key)] = getattr(self.addresses, key)
        if service == "worker":
            # Each worker binds its own KV transfer socket (services/worker/README.md).
            env[env_name("transfer_addr")] = f"ipc://{transfer_socket(self.run_dir, replica)}"
            env[env_name("worker_role")] = worker_role(self.supervisor.worker_roles, replica)
        # Children log and trace under their own names; never inherit ours.
        env.pop("OTEL_SERVICE_NAME", None)
        return env

    def with_model(self, model_dir: Path, served_name: str) -> MeshSettings:
        """Pin the model folder (and the name it is served under, unless the caller
        chose one) for every child, so none of them resolves or generates it again."""
        overrides = dict(self.child_overrides)
        overrides[env_name("model")] = str(model_dir)
        name_key = env_name("served_model_name")
        if not overrides.get(name_key) and not self.environ.get(name_key):
            overrides[name_key] = served_name
        return replace(self, child_overrides=overrides)

    def effective_configs(self) -> dict[str, msgspec.Struct]:
        """Each config struct as a replica-0 child (or the supervisor) sees it."""
        env = self.child_env("api", 0)
        env[env_name("run_dir")] = str(self.run_dir)
        return {name: load_config(cls, environ=env) for name, cls in CONFIG_STRUCTS.items()}


WORKER_ROLES = ("prefill", "decode", "both")


def worker_roles(setting: str) -> list[str]:
    """``--worker-roles`` as a list (empty: every worker ``both``); ValueError names
    a bad entry."""
    if not setting.strip():
        return []
    roles = [role.strip() for role in setting.split(",")]
    for role in roles:
        if role not in WORKER_ROLES:
            raise ValueError(f"--worker-roles: {role!r} is not a role; each entry is one "
                             f"of {', '.join(WORKER_ROLES)}, e.g. prefill,decode")
    return roles


def worker_role(setting: str, replica: int) -> str:
    """Worker ``replica``'s role: its entry of the list, or the last entry past its end
    (so replicas added by `scale worker=N` follow the list's last role)."""
    roles = worker_roles(setting)
    if not roles:
        return "both"
    return roles[min(replica, len(roles) - 1)]


def api_key_setting(keys: list[str]) -> str:
    """``--api-key`` values as the api's ``MESHSERVE_API_KEY`` (comma-separated)."""
    for key in keys:
        if not key.strip() or "," in key or key != key.strip():
            raise ValueError("--api-key: a key must be non-empty, without commas or "
                             "surrounding spaces")
    return ",".join(keys)


def _model_flag(model: str | None) -> str | None:
    """A folder becomes absolute (children run elsewhere); a hub id stays as it is."""
    if not model:
        return None
    return model if is_hub_id(model) else str(Path(model).expanduser().absolute())


def resolve_settings(flags: Flags, environ: Mapping[str, str]) -> MeshSettings:
    """Merge env, ``--set`` and flags; raise ValueError naming what is wrong."""
    overrides = parse_settings(flags.settings)
    overrides.update({env_name(key): value for key, value in flags.config.items()})
    named: dict[str, object | None] = {
        "model": _model_flag(flags.model),
        "host": flags.host,
        "port": flags.port,
        "device": flags.device,
        "tokenizers": flags.tokenizers,
        "workers": flags.workers,
        "tts_replicas": flags.tts,
        "run_dir": flags.run_dir,
        "shutdown_timeout_s": flags.shutdown_timeout,
    }
    for key, value in named.items():
        if value is not None:
            overrides[env_name(key)] = str(value)
    # A chat template file is read by children that may run elsewhere: make it absolute.
    template = overrides.get(env_name("chat_template"), "")
    if template and Path(template).expanduser().is_file():
        overrides[env_name("chat_template")] = str(Path(template).expanduser().absolute())
    merged = {**environ, **overrides}
    supervisor = load_config(SupervisorConfig, environ=merged)
    run_dir = Path(supervisor.run_dir).expanduser().absolute() if supervisor.run_dir else (
        default_run_dir()
    )
    check_run_dir(run_dir)
    for name, value in (("tokenizers", supervisor.tokenizers), ("workers", supervisor.workers)):
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    worker_roles(supervisor.worker_roles)  # a bad entry fails here, not in every worker
    if supervisor.tts_replicas < 0:
        raise ValueError(f"--tts must be at least 0, got {supervisor.tts_replicas}")
    # The run dir is the supervisor's own business; children get addresses instead.
    overrides.pop(env_name("run_dir"), None)
    # `up` always speaks CURVE: every child (and the supervisor) gets the key dir.
    overrides[env_name("curve_dir")] = str(curve_dir(run_dir, merged))
    merged = {**environ, **overrides}
    settings = MeshSettings(
        run_dir=run_dir,
        supervisor=supervisor,
        process=load_config(ProcessConfig, environ=merged),
        addresses=mesh_addresses(run_dir),
        api=load_config(ApiConfig, environ=merged),
        child_overrides=overrides,
        environ=dict(environ),
    )
    # Fail now, with the field's name, rather than in every child at start.
    settings.effective_configs()
    return settings
