"""Process bootstrap shared by every service's ``__main__``.

It configures logs and telemetry, runs the service's ``main`` inside one task
group under asyncio (zmq.asyncio does not run under trio), turns SIGTERM/SIGINT
into cancellation (for a service that drains, into ``stop_requested`` first),
keeps a heartbeat link to the supervisor when there is one, and flushes spans on
the way out.
"""

from __future__ import annotations

import cProfile
import faulthandler
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import zmq.asyncio

from shared.config import MeshAddresses, ProcessConfig, load_config
from shared.endpoints import connect_dealer
from shared.logs import configure_logging, get_logger
from shared.mesh import DealerEndpoint, Identity, UpstreamLost
from shared.mesh_auth import MeshAuth
from shared.protocol.common import Hello, Rejected
from shared.telemetry import configure_telemetry, shutdown_telemetry

log = get_logger("meshserve.service")


@dataclass
class ServiceRuntime:
    """What a service's ``main`` gets: who it is, where the mesh is and the ZMQ
    context its endpoints live in (``shared.endpoints`` builds them from it)."""

    identity: Identity
    process: ProcessConfig
    addresses: MeshAddresses
    zmq: zmq.asyncio.Context
    # Reported in every hello (to the supervisor and to the singletons a replica
    # serves); a service sets it once it can do its job (model loaded, upstream
    # reached), and clears it when it cannot.
    ready: bool = False
    capacity: int = 1
    # A service that drains (the api) sets ``drains_on_signal`` before it starts
    # serving: the first SIGTERM/SIGINT then only sets ``stop_requested`` and the
    # service's ``main`` returns once it has drained; a second signal cancels.
    drains_on_signal: bool = False
    stop_requested: anyio.Event = field(default_factory=anyio.Event)
    # Set (monotonic) while a unit of work that must finish runs off the event loop
    # (a worker's step), None when idle: every hello reports for how long.
    busy_since: float | None = None
    # CURVE for every endpoint, when the process has a key dir; its ZAP handler
    # runs before ``main`` starts.
    auth: MeshAuth | None = None

    def hello(self) -> Hello:
        """This process's hello as of now: its readiness, capacity and busy time."""
        busy_s = 0.0 if self.busy_since is None else time.monotonic() - self.busy_since
        return self.identity.hello(ready=self.ready, capacity=self.capacity, busy_s=busy_s)


ServiceMain = Callable[[ServiceRuntime], Awaitable[None]]


async def _supervisor_link(runtime: ServiceRuntime) -> None:
    link: DealerEndpoint[Rejected] = connect_dealer(
        runtime, runtime.addresses.supervisor_addr, Rejected
    )
    async with anyio.create_task_group() as tg:
        await tg.start(link.run)
        async for event in link.inbox:
            if isinstance(event, UpstreamLost):
                log.warning("supervisor unreachable", reason=event.reason)


async def _write_health(runtime: ServiceRuntime, path: Path) -> None:
    """Keep a small JSON file current for container healthchecks."""
    staging = path.with_suffix(".tmp")
    while True:
        staging.write_text(json.dumps({"ready": runtime.ready, "at": time.time(),
                                       "heartbeat_s": runtime.process.heartbeat_s}))
        staging.replace(path)
        await anyio.sleep(runtime.process.heartbeat_s)


async def _run(service: str, main: ServiceMain) -> None:
    process = load_config(ProcessConfig)
    addresses = load_config(MeshAddresses)
    ctx = zmq.asyncio.Context()
    try:
        async with anyio.create_task_group() as tg:
            runtime = ServiceRuntime(
                identity=Identity(service, process.replica_id()),
                process=process,
                addresses=addresses,
                zmq=ctx,
                auth=MeshAuth.from_dir(process.curve_dir, service) if process.curve_dir else None,
            )
            if runtime.auth is not None:
                await tg.start(runtime.auth.run_zap, ctx)

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if runtime.drains_on_signal and not runtime.stop_requested.is_set():
                            log.info("draining", signal=name)
                            runtime.stop_requested.set()
                            continue
                        log.info("stopping", signal=name)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_signal)
            if addresses.supervisor_addr:
                tg.start_soon(_supervisor_link, runtime)
            if process.health_file:
                tg.start_soon(_write_health, runtime, Path(process.health_file))
            log.info("starting", pid=os.getpid())
            await main(runtime)
            tg.cancel_scope.cancel()
    finally:
        ctx.destroy(linger=0)


def serve(service: str, main: ServiceMain) -> None:
    """Run ``main`` as the process for ``service`` until it returns or a signal."""
    process = load_config(ProcessConfig)
    configure_logging(service, process.replica_id(), process.log_level)
    configure_telemetry(service, process.replica_id())
    # `kill -USR1 PID` writes every thread's stack to the log (stderr): how to see
    # where a stalled service is without stopping it (a native call holding the GIL
    # included, which no in-process task could report).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    profiler = _profiler(process)
    try:
        if profiler is not None:
            profiler.enable()
        anyio.run(_run, service, main, backend="asyncio")
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("service crashed")
        shutdown_telemetry()
        sys.exit(1)
    finally:
        if profiler is not None:
            profiler.disable()
            path = Path(process.profile_dir) / f"{service}-{process.replica_id()}.pstats"
            profiler.dump_stats(path)
            log.info("profile written", path=str(path))
    shutdown_telemetry()
    log.info("stopped")


def _profiler(process: ProcessConfig) -> cProfile.Profile | None:
    """A deterministic profiler of the whole process, when asked for: costly, but it
    is how to find which Python a step spends its time in."""
    if not process.profile_dir:
        return None
    Path(process.profile_dir).mkdir(parents=True, exist_ok=True)
    return cProfile.Profile()


__all__ = ["ServiceRuntime", "serve"]
