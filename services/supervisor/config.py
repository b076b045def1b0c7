from __future__ import annotations

import msgspec


class SupervisorConfig(msgspec.Struct, frozen=True):
    """supervisor settings (env MESHSERVE_<FIELD>; `meshserve up` flags win)."""

    run_dir: str = ""  # empty: /tmp/meshserve-<uid>; holds sockets, pid file, detached log
    tokenizers: int = 1  # tokenizer replicas
    workers: int = 1  # worker replicas
    # Worker roles by replica index, comma-separated: prefill | decode | both
    # (services/scheduler/README.md, Roles). A list shorter than the workers repeats
    # its last entry (also for replicas `scale worker=N` adds); empty: every worker both.
    worker_roles: str = ""
    tts_replicas: int = 1  # tts replicas (0: no speech)
    startup_timeout_s: float = 300.0  # every child healthy within this, or `up` fails
    hello_timeout_s: float = 120.0  # a started child says hello within this, or is killed
    stop_timeout_s: float = 5.0  # SIGTERM, then SIGKILL after this
    # Shutdown drains the api first: it gets this long (plus stop_timeout_s to exit)
    # to finish its requests while the rest of the mesh serves them; the api reads
    # the same setting (`--shutdown-timeout`).
    shutdown_timeout_s: float = 30.0
    restart_intensity: int = 5  # more restarts of one service than this ...
    restart_period_s: float = 30.0  # ... within this window: give up, stop the mesh
    backoff_initial_s: float = 0.1  # first restart delay, doubling per crash
    backoff_max_s: float = 5.0  # restart delay cap
    backoff_reset_s: float = 10.0  # healthy this long: the delay starts over
    # A child whose heartbeat says one unit of work (a worker's step) has run this
    # long is hung although it beats: killed and restarted (0: no limit).
    step_timeout_s: float = 60.0
    # Fork children from a zygote that imported torch and the services once (a
    # killed worker is back in about a second); off: every child is a fresh
    # `python -m services.<svc>`. Either way a child gets the same environment.
    zygote: bool = True
