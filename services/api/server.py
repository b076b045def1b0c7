"""The api process: the text actor, the speech gateway and uvicorn in one task group.

uvicorn runs *inside* the service's task group rather than owning the event
loop, and without its signal handlers: ``shared/service.py`` turns SIGTERM/SIGINT
into cancellation, and cancellation is how the HTTP server learns to stop.

Shutdown order, on cancellation: every in-flight request is failed (503
``shutting_down``) so its handler answers at once; uvicorn stops accepting, lets
open connections finish for up to ``shutdown_grace_s``, then cancels what is left.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import anyio
import uvicorn
from anyio.abc import TaskStatus
from starlette.types import ASGIApp

from services.api.app import build_app
from services.api.auth import ApiKeyCheck, ApiKeyGuard, parse_api_keys
from services.api.config import ApiConfig
from services.api.metrics import render_auth_metrics
from services.api.service import ApiActor
from services.api.speech_gateway import SpeechGateway
from services.api.speech_routes import speech_routes
from shared.config import load_config
from shared.logs import get_logger
from shared.model_source import served_model_name
from shared.service import ServiceRuntime

log = get_logger("meshserve.api")


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals alone and says when it is listening."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would install SIGINT/SIGTERM handlers of its own (and re-raise
        # the signal on exit); the service runtime owns signals.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()

    def bound_port(self) -> int:
        port: int = self.servers[0].sockets[0].getsockname()[1]
        return port


async def serve_http(
    app: ASGIApp,
    config: ApiConfig,
    on_stop: Callable[[], None],
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; reports the bound port once listening.

    ``on_stop`` runs first on the way out, before uvicorn drains connections.
    """
    server = EmbeddedServer(uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        lifespan="off",
        timeout_graceful_shutdown=config.shutdown_grace_s,
    ))

    async def run_server() -> None:
        # Shielded: uvicorn must run its shutdown (close the listener, drain
        # connections) after we are cancelled; it stops once should_exit is set.
        with anyio.CancelScope(shield=True):
            try:
                await server.serve()
            except SystemExit as e:  # uvicorn exits the process when it cannot bind
                raise OSError(f"cannot serve HTTP on {config.host}:{config.port}") from e
        if not server.should_exit:
            raise RuntimeError("the HTTP server stopped on its own")

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_server)
        try:
            await server.listening.wait()
            port = server.bound_port()
            log.info("http listening", host=config.host, port=port)
            task_status.started(port)
            await anyio.sleep_forever()
        finally:
            on_stop()
            server.should_exit = True


async def main(runtime: ServiceRuntime) -> None:
    config = load_config(ApiConfig)
    served = served_model_name(config.model, config.served_model_name)
    actor = ApiActor(runtime, config)
    speech = SpeechGateway(runtime, config)

    def auth_metrics() -> str:
        # `guard` wraps the app built below; /metrics is served only once it exists.
        zmq_refused = runtime.auth.failures if runtime.auth is not None else 0
        return render_auth_metrics(guard.refusals.count, zmq_refused)

    app = build_app(
        actor, config, served,
        extra_routes=speech_routes(speech, config),
        metrics_sources=[speech.render_metrics, auth_metrics],
    )
    guard = ApiKeyGuard(app, ApiKeyCheck(parse_api_keys(config.api_key)))
    log.info("serving", model=served)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        await tg.start(speech.run)
        await tg.start(serve_http, guard, config, actor.stop)
